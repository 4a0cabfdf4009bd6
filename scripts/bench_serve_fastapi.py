#!/usr/bin/env python3
"""The captioning server a Python user would write: FastAPI + transformers, the same checkpoint,
the Inference API's image-to-text route (JSON with a base64 image and generation parameters, as
blip serve is sent), generation in FastAPI's thread pool. The Python side of
scripts/bench_serve.py.

    .venv/bin/python scripts/bench_serve_fastapi.py MODEL_DIR PORT
"""
import base64
import io
import os
import sys

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

model_dir, port = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(os.cpu_count())
processor = BlipProcessor.from_pretrained(model_dir)
model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
app = FastAPI()


def caption(data: bytes, parameters: dict) -> str:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    with torch.no_grad():
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        out = model.generate(pixel_values=pixel_values, **parameters)
    return processor.decode(out[0], skip_special_tokens=True)


@app.get("/health")
def health():
    return {"status": "ok"}


@app.post("/models/{model_id:path}")
async def image_to_text(model_id: str, request: Request):
    body = await request.json()
    data = base64.b64decode(body["inputs"])
    return [{"generated_text": await run_in_threadpool(caption, data, body.get("parameters", {}))}]


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
