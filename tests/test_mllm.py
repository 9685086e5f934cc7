"""The MLLM encoder family: LLaVA-style checkpoints read as conditional encoders (issue 24).

Every supported family has a tiny random checkpoint built offline (conftest): LLaVA (fixed image
tokens) and Idefics3, SmolVLM's family (image tiles, so image token counts vary per image).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from conftest import draw_image, make_image_folder
from focalsearch.cli import app

runner = CliRunner()
INSTRUCTIONS = ["color", "", "what shape is the object?", "background", "how many shapes are there?", "quantity"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def images(count: int = 5) -> list[Image.Image]:
    """Pictures of several shapes and aspect ratios (an Idefics3 processor tiles them differently)."""
    return [draw_image(i, (40 + 13 * i, 30 + 7 * (i % 3))) for i in range(count)]


@pytest.fixture(scope="module", params=["tiny_llava", "tiny_idefics3"])
def family(request):
    from focalsearch.models import create_encoder

    path = request.getfixturevalue(request.param)
    return path, create_encoder(str(path), device="cpu", precision="float32", batch_size=8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_auto_picks_the_mllm_family_from_the_config(family):
    from focalsearch.models.mllm_family import MllmEncoder

    path, encoder = family
    assert isinstance(encoder, MllmEncoder)
    assert encoder.info.encoder == "mllm" and encoder.info.dim == encoder.model.config.get_text_config().hidden_size
    assert json.loads(encoder.info.prompts)["image"] == "{instruction}\nAnswer in one word."


def test_prefix_reuse_equals_reading_every_instruction_whole(family):
    _, encoder = family
    batch = images()
    try:
        encoder.reuse_prefix = True
        reused = encoder.encode_images_under(batch, INSTRUCTIONS)
        encoder.reuse_prefix = False
        whole = encoder.encode_images_under(batch, INSTRUCTIONS)
    finally:
        encoder.reuse_prefix = True
    for instruction, a, b in zip(INSTRUCTIONS, reused, whole):
        assert a.shape == (len(batch), encoder.info.dim)
        assert cosines(a, b).min() >= 0.9999, instruction
    # The instruction is read: the vectors under two instructions differ.
    assert cosines(reused[0], reused[2]).max() < 0.9999


def test_an_image_alone_equals_the_same_image_in_a_padded_batch(family):
    _, encoder = family
    batch = images()
    together = encoder.encode_images(batch, "color")
    for i, image in enumerate(batch):
        alone = encoder.encode_images([image], "color")
        assert cosines(alone, together[i : i + 1])[0] >= 0.9999


def test_prompts_follow_the_checkpoints_chat_template(family):
    _, encoder = family
    prompts = encoder.prompts
    assert prompts.image_prefix.endswith("<|user|><image>")  # the image comes first, so its cache is shared
    assert prompts.image_suffix("color") == "color\nAnswer in one word.<|end|><|assistant|>"
    assert prompts.image_suffix("") == "Describe the image in one word.<|end|><|assistant|>"
    assert prompts.text_chat("red") == "<s><|user|>red\nSummarize the above in one word.<|end|><|assistant|>"
    ids = prompts.prefix_inputs(images(2))["input_ids"]
    assert (ids == encoder.tokenizer.bos_token_id).sum(dim=1).tolist() == [1, 1]  # the template's BOS, not a second


def test_text_queries_and_bfloat16(family):
    _, encoder = family
    texts = encoder.encode_texts(["red", "a blue square on a white background", "two"])
    assert texts.shape == (3, encoder.info.dim)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    plain = encoder.encode_images(images(3), "color")
    bf16 = encoder.encode_images(images(3), "color", precision="bfloat16")
    assert cosines(plain, bf16).min() > 0.97


def test_the_wrong_family_is_a_one_line_error(tiny_llava, tiny_clip, tmp_path):
    photos = tmp_path / "photos"
    make_image_folder(photos, 3)
    wrong = cli("index", photos, "-i", "color", "--model", tiny_clip, "--encoder", "mllm", "--index", tmp_path / "a")
    assert wrong.exit_code == 2 and "not a vision-language model" in wrong.stderr and "Traceback" not in wrong.output
    wrong = cli("index", photos, "-i", "color", "--model", tiny_llava, "--encoder", "focallens", "--index", tmp_path / "b")
    assert wrong.exit_code == 2 and "use --encoder mllm" in wrong.stderr and "Traceback" not in wrong.output


@pytest.fixture(scope="module")
def mllm_index(tmp_path_factory, tiny_llava):
    root = tmp_path_factory.mktemp("mllm-index")
    model = root / "model"
    shutil.copytree(tiny_llava, model)  # a copy whose prompts one test changes
    photos = root / "photos"
    make_image_folder(photos, 12)
    index = root / "index"
    result = cli("index", photos, "-i", "color", "-i", "shape", "--model", model, "--encoder", "mllm", "--index", index,
                 "--json")
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model, "photos": photos, "index": index, "report": json.loads(result.stdout)}


def test_index_and_query_by_image_and_text(mllm_index):
    assert mllm_index["report"]["conditions"] == {"color": 12, "shape": 12}
    query = sorted(mllm_index["photos"].rglob("*.png"))[0]
    out = cli("query", query, "-i", "shape", "--index", mllm_index["index"], "-k", "3", "--json")
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)["results"]
    assert len(hits) == 3 and str(query) not in [h["path"] for h in hits]
    text = cli("query", "--text", "red", "-i", "color", "--index", mllm_index["index"], "-k", "4", "--json")
    assert text.exit_code == 0, text.output
    assert len(json.loads(text.stdout)["results"]) == 4


def test_the_catalog_records_the_prompts_and_refuses_other_ones(mllm_index):
    from focalsearch.store import Store

    conditions = Store(mllm_index["index"]).conditions()
    assert {c.encoder for c in conditions} == {"mllm"}
    assert all(json.loads(c.prompts)["text"] == "{text}\nSummarize the above in one word." for c in conditions)
    config_file = mllm_index["model"] / "config.json"
    original = config_file.read_text()
    config = json.loads(original)
    config["focallens_prompts"] = {"image": "{instruction}\nOne word:", "text": "{text}\nOne word:",
                                   "unconditional": "One word:"}
    config_file.write_text(json.dumps(config))
    try:
        out = cli("query", "--text", "red", "-i", "color", "--index", mllm_index["index"])
        assert out.exit_code == 2 and "other prompt templates" in out.stderr and "Traceback" not in out.output
    finally:
        config_file.write_text(original)


def test_the_server_searches_and_compares(mllm_index):
    from focalsearch.server.app import create_app

    application = create_app(mllm_index["index"])
    with TestClient(application, base_url="http://127.0.0.1") as client:
        found = client.post("/api/search", json={"text": "red", "instruction": "color", "k": 3})
        assert found.status_code == 200, found.text
        from focalsearch.store import row_id

        first = row_id(found.json()["results"][0]["path"])
        compared = client.post("/api/compare", json={"image_id": first, "instructions": ["color", "shape"], "k": 3})
        assert compared.status_code == 200, compared.text
        assert [c["instruction"] for c in compared.json()["columns"]] == ["color", "shape"]
        weighted = client.post("/api/search", json={"image_id": first, "k": 3,
                                                    "conditions": [{"instruction": "shape", "weight": 1},
                                                                   {"instruction": "color", "weight": -1}]})
        assert weighted.status_code == 200, weighted.text
    application.state.engine.close()


def test_serve_with_two_workers_answers_alike(mllm_index):
    import subprocess
    import sys

    import httpx

    from test_server import wait_until_serving

    process = subprocess.Popen([sys.executable, "-m", "focalsearch.cli", "serve", "--index", str(mllm_index["index"]),
                                "--port", "0", "--workers", "2"], stderr=subprocess.PIPE, text=True)
    try:
        url = wait_until_serving(process)
        answers = [httpx.post(url + "/api/search", json={"text": "red", "instruction": "color", "k": 4}, timeout=60).json()
                   for _ in range(4)]
        scores = [sorted(r["score"] for r in a["results"]) for a in answers]
        assert all(s == pytest.approx(scores[0], abs=1e-4) for s in scores) and len(scores[0]) == 4
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_ray_engine_says_it_takes_clip_models_only(mllm_index):
    out = cli("index", mllm_index["photos"], "-i", "color", "--index", mllm_index["index"], "--engine", "ray")
    assert out.exit_code == 2 and "CLIP-family models only" in out.stderr and "Traceback" not in out.output


def test_a_family_whose_reading_packing_would_change_is_refused(tiny_llava, tmp_path):
    model = tmp_path / "qwen-like"
    shutil.copytree(tiny_llava, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "qwen2_vl"
    (model / "config.json").write_text(json.dumps(config))
    photos = tmp_path / "photos"
    make_image_folder(photos, 2)
    out = cli("index", photos, "-i", "color", "--model", model, "--index", tmp_path / "index")
    assert out.exit_code == 2 and "does not support yet: its 3-D rotary positions" in out.stderr
    assert "Traceback" not in out.output


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "colorshape"


def colour_of(path: str) -> str:
    return Path(path).stem.split("-")[1]


def test_the_bundled_demo_mllm_indexes_queries_and_serves(tmp_path):
    """The shipped miniature LLaVA, prompted only, through index -> query -> serve on the example images."""
    from focalsearch.server.app import create_app

    index = tmp_path / "index"
    built = cli("index", EXAMPLES, "-i", "color", "-i", "background", "--model", "demo-mllm", "--index", index, "--json")
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["conditions"] == {"color": 120, "background": 120}
    query = EXAMPLES / "images" / "00014-blue-triangle-on-black.png"
    out = cli("query", query, "-i", "color", "-k", "5", "--index", index, "--json")
    assert out.exit_code == 0, out.output
    hits = [h["path"] for h in json.loads(out.stdout)["results"]]
    assert [colour_of(p) for p in hits] == ["blue"] * 5  # prompted only, colour is what it reads best
    application = create_app(index)
    with TestClient(application, base_url="http://127.0.0.1") as client:
        found = client.post("/api/search", json={"text": "blue", "instruction": "color", "k": 5})
        assert found.status_code == 200, found.text
        assert sum(colour_of(r["path"]) == "blue" for r in found.json()["results"]) >= 4
        from focalsearch.store import row_id

        compared = client.post("/api/compare", json={"image_id": row_id(str(query.resolve())),
                                                      "instructions": ["color", "background"], "k": 5})
        assert compared.status_code == 200, compared.text
        color, background = compared.json()["columns"]
        assert [colour_of(r["path"]) for r in color["results"]] == ["blue"] * 5
        assert all(r["path"].endswith("-on-black.png") for r in background["results"])
    application.state.engine.close()
