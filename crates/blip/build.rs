//! With the `openblas` feature, links OpenBLAS statically (from the system's libopenblas-dev,
//! found by pkg-config), so the `blip` binary still runs on machines without it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "openblas")]
    link_openblas();
}

#[cfg(feature = "openblas")]
fn link_openblas() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let library = pkg_config::Config::new().cargo_metadata(false).probe("openblas").unwrap_or_else(|err| {
        panic!(
            "the `openblas` feature needs OpenBLAS: install libopenblas-dev (scripts/install-build-deps.sh), \
             or build without it (--no-default-features): {err}"
        )
    });
    for dir in &library.link_paths {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    // sgemm needs only libpthread and libm from OpenBLAS's dependencies (std links both); the
    // Fortran runtime is for LAPACK, which is not linked in.
    println!("cargo:rustc-link-lib=static=openblas");
}
