"""`blip serve` called with the real clients people use: huggingface_hub's InferenceClient and
the official openai client. Every answer equals what the `blip` CLI gives on the same image.

Run by scripts/test-clients.sh (which makes the pinned environment) after the Rust tests have
built target/release/blip; the fixtures are the repository's tiny models.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import unittest
from pathlib import Path

import numpy as np
from huggingface_hub import InferenceClient
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[4]
BLIP = Path(os.environ.get("BLIP_BIN", ROOT / "target" / "release" / "blip"))
FIXTURES = ROOT / "crates" / "blip" / "tests" / "fixtures"
MODELS = {name: FIXTURES / "models" / name for name in ["tiny-caption-bin", "tiny-vqa", "tiny-itm"]}
IMAGE = FIXTURES / "images-model" / "chelsea.png"
ROCKET = FIXTURES / "images-model" / "rocket.jpg"
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def cli(*args):
    """The CLI's JSONL records."""
    out = subprocess.run([BLIP, *map(str, args), "--format", "jsonl"], capture_output=True, text=True, env=ENV)
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return [json.loads(line) for line in out.stdout.splitlines()]


class Server:
    """`blip serve --port 0` on the tiny models, until stopped."""

    def __init__(self):
        args = [BLIP, "serve", "--port", "0"]
        for path in MODELS.values():
            args += ["--model", str(path)]
        self.process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=ENV)
        self.base = None
        seen = []
        for line in self.process.stderr:
            seen.append(line)
            if line.startswith("listening on "):
                self.base = line.split()[-1]
            if line.strip() == "ready":
                break
        else:
            raise AssertionError("blip serve exited: " + "".join(seen))
        # Keep reading the log so that the pipe never fills.
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


class Clients(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def client(self, path):
        return InferenceClient(model=self.server.base + path)

    def test_image_to_text(self):
        expected = cli("caption", "--model", MODELS["tiny-caption-bin"], IMAGE)[0]["caption"]
        output = self.client("/models/tiny-caption-bin").image_to_text(IMAGE)
        self.assertEqual(output.generated_text, expected)

    def test_visual_question_answering(self):
        record = cli("vqa", "--model", MODELS["tiny-vqa"], "--question", "what is this?", IMAGE)[0]
        answers = self.client("/models/tiny-vqa").visual_question_answering(image=IMAGE, question="what is this?")
        self.assertEqual(answers[0].answer, record["answer"])
        self.assertAlmostEqual(answers[0].score, float(np.exp(np.float32(record["log_prob"]))), delta=1e-6)

    def test_zero_shot_image_classification(self):
        labels = ["cat", "dog", "rocket"]
        record = cli("classify", "--model", MODELS["tiny-itm"], "--labels", ",".join(labels), IMAGE)[0]
        expected = sorted(((l["label"], l["probability"]) for l in record["labels"]), key=lambda x: -x[1])
        output = self.client("/models/tiny-itm").zero_shot_image_classification(IMAGE, candidate_labels=labels)
        self.assertEqual([(o.label, o.score) for o in output], expected)

    def test_feature_extraction(self):
        record = cli("embed", "--model", MODELS["tiny-itm"], "--text", "a cat on a sofa")[0]
        output = self.client("/pipeline/feature-extraction/tiny-itm").feature_extraction("a cat on a sofa")
        self.assertEqual(output.shape, (1, len(record["embedding"])))
        np.testing.assert_allclose(output[0], np.array(record["embedding"], dtype=np.float32), rtol=0, atol=1e-6)

    def openai(self):
        return OpenAI(base_url=self.server.base + "/v1", api_key="unused", max_retries=0)

    def data_url(self, path):
        return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()

    def test_openai_chat_completion(self):
        expected = cli("caption", "--model", MODELS["tiny-caption-bin"], "--max-new-tokens", 8, ROCKET)[0]
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.data_url(ROCKET)}}]}]
        completion = self.openai().chat.completions.create(model="tiny-caption-bin", messages=messages, max_tokens=8)
        self.assertEqual(completion.choices[0].message.content, expected["caption"])
        self.assertEqual(completion.usage.completion_tokens, len(expected["tokens"]) - 1)

        # A question to the VQA model.
        record = cli("vqa", "--model", MODELS["tiny-vqa"], "--question", "what is in the sky?", ROCKET)[0]
        messages[0]["content"].insert(0, {"type": "text", "text": "what is in the sky?"})
        completion = self.openai().chat.completions.create(model="tiny-vqa", messages=messages)
        self.assertEqual(completion.choices[0].message.content, record["answer"])

    def test_openai_streaming(self):
        expected = cli("caption", "--model", MODELS["tiny-caption-bin"], "--max-new-tokens", 12, IMAGE)[0]["caption"]
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": self.data_url(IMAGE)}}]}]
        stream = self.openai().chat.completions.create(
            model="tiny-caption-bin", messages=messages, max_tokens=12, stream=True
        )
        pieces, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        self.assertEqual("".join(pieces), expected)
        self.assertGreater(len(pieces), 1)
        self.assertIn(finish, ("stop", "length"))


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
