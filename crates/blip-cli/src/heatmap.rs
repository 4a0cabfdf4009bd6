//! Grad-CAM maps drawn over their image as the BLIP demo draws them (LAVIS's `getAttMap`): the
//! patch map scaled to [0, 1], upsampled to the image (cubic), blurred (a Gaussian of 2% of
//! the longer side), scaled again, coloured with matplotlib's `jet`, and blended with the image
//! with weight `map^0.7`.

use image::{ImageBuffer, Luma, Rgb, RgbImage};

/// The heatmap of `map` (`grid` rows × columns of patches) over `image`.
pub fn overlay(image: &RgbImage, map: &[f32], grid: (usize, usize)) -> RgbImage {
    let (width, height) = image.dimensions();
    let mut cells: ImageBuffer<Luma<f32>, Vec<f32>> =
        ImageBuffer::from_raw(grid.1 as u32, grid.0 as u32, map.to_vec()).expect("grid holds the map");
    normalize(&mut cells);
    let upsampled = image::imageops::resize(&cells, width, height, image::imageops::FilterType::CatmullRom);
    let sigma = 0.02 * width.max(height) as f32;
    let mut blurred = image::imageops::blur(&upsampled, sigma);
    normalize(&mut blurred);
    RgbImage::from_fn(width, height, |x, y| {
        let heat = blurred.get_pixel(x, y)[0].clamp(0.0, 1.0);
        let weight = heat.powf(0.7);
        let colour = jet(heat);
        let pixel = image.get_pixel(x, y);
        Rgb(std::array::from_fn(|c| {
            let blended: f32 = (1.0 - weight) * pixel[c] as f32 / 255.0 + weight * colour[c];
            (blended * 255.0).round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// Shifts and scales the values to [0, 1] (all zeros when they are all equal).
fn normalize(values: &mut ImageBuffer<Luma<f32>, Vec<f32>>) {
    let min = values.pixels().map(|p| p[0]).fold(f32::INFINITY, f32::min);
    values.pixels_mut().for_each(|p| p[0] -= min);
    let max = values.pixels().map(|p| p[0]).fold(0.0, f32::max);
    if max > 0.0 {
        values.pixels_mut().for_each(|p| p[0] /= max);
    }
}

/// matplotlib's `jet` colormap (its piecewise-linear segments) at `x` in [0, 1].
fn jet(x: f32) -> [f32; 3] {
    const RED: &[(f32, f32)] = &[(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)];
    const GREEN: &[(f32, f32)] = &[(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)];
    const BLUE: &[(f32, f32)] = &[(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)];
    let channel = |segments: &[(f32, f32)]| {
        let k = segments.windows(2).position(|w| x <= w[1].0).unwrap_or(segments.len() - 2);
        let ((x0, y0), (x1, y1)) = (segments[k], segments[k + 1]);
        y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    };
    [channel(RED), channel(GREEN), channel(BLUE)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_runs_from_dark_blue_through_green_to_dark_red() {
        assert_eq!(jet(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(jet(0.5)[1], 1.0);
        assert_eq!(jet(1.0), [0.5, 0.0, 0.0]);
    }

    #[test]
    fn the_hot_patch_is_red_and_the_rest_keeps_the_image() {
        let image = RgbImage::from_pixel(64, 64, Rgb([200, 200, 200]));
        let mut map = vec![0.0; 16];
        map[0] = 1.0; // top-left patch of a 4x4 grid
        let drawn = overlay(&image, &map, (4, 4));
        assert_eq!(drawn.dimensions(), (64, 64));
        let hot = drawn.get_pixel(2, 2);
        assert!(hot[0] > 120 && hot[2] < 60, "{hot:?}");
        let cold = drawn.get_pixel(60, 60);
        assert!(cold[0] > 150 && cold[1] > 150, "{cold:?}");
    }
}
