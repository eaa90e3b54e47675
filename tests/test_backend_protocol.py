"""The Label Studio protocol through the Flask test client, with the payloads recorded from a
live Label Studio 1.23.2; masks decoded with the SDK and compared with the model's own output."""
import copy
import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from rfclip_engine import Segmenter
from rfclip_engine.imageio import load_rgb

from .backend_support import BRUSH_CONFIG, SAMPLES, TEST_CONFIG, make_app, png, rasterize_polygon

TOKEN = "TESTTOKEN-1234567890"


@pytest.fixture
def client(tiny_model, tmp_path, fake_ls):
    app = make_app(tiny_model, tmp_path, label_studio_url=fake_ls.url, label_studio_api_key=TOKEN)
    app.extensions["rfclip"]["holder"].get(60)  # loaded, so tests measure the protocol
    return app.test_client()


def recorded_predict_body(fake_ls):
    """The recorded Retrieve-Predictions request, pointed at this test's media host."""
    body = copy.deepcopy(SAMPLES["POST /predict (request, Retrieve Predictions / task open)"]["body"])
    fake_ls.uploads["1/e8198b09-cat_upload.png"] = png(120, 160, seed=1)
    fake_ls.uploads["1/0de567ef-dog_url.png"] = png(90, 70, seed=2)
    fake_ls.public["cat_upload.png"] = png(100, 100, seed=3)
    fake_ls.public["dog_url.png"] = png(64, 200, seed=4)
    for task in body["tasks"]:
        image = task["data"]["image"]
        if image.startswith("http://"):
            task["data"]["image"] = f"{fake_ls.url}/img/{image.rsplit('/', 1)[1]}"
    return body


def expected_label_map(tiny_model, image_bytes, labels):
    return Segmenter(tiny_model, TEST_CONFIG).predict(load_rgb(image_bytes), labels).label_map.numpy()


def decode_brush(region):
    h, w = region["original_height"], region["original_width"]
    return np.reshape(decode_rle(region["value"]["rle"]), (h, w, 4))[:, :, 3] == 255


def test_health_answers_at_once_and_reports_state(tiny_model, tmp_path):
    release = []

    def slow_loader(settings, cache):
        while not release:
            time.sleep(0.01)
        return Segmenter(tiny_model, TEST_CONFIG, text_cache=cache)

    from backend.app import create_app
    from backend.settings import Settings

    app = create_app(Settings(cache_dir=tmp_path), segmenter_loader=slow_loader)
    client = app.test_client()
    started = time.monotonic()
    body = client.get("/health").get_json()
    assert time.monotonic() - started < 1.0
    assert body["status"] == "UP" and body["model"]["state"] == "loading"
    assert body["redis"] == "disabled" and body["device"] == "cpu"
    release.append(True)
    app.extensions["rfclip"]["holder"].get(10)
    assert client.get("/health").get_json()["model"]["state"] == "ready"


def test_setup_with_recorded_request(client):
    body = SAMPLES["POST /setup (request)"]["body"]
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    version = response.get_json()["model_version"]
    assert version.startswith("rfclip-ViT-B-16-openai-rfclip-") and version == client.get("/versions").get_json()["versions"][0]


def test_predict_with_recorded_request(client, fake_ls, tiny_model):
    body = recorded_predict_body(fake_ls)
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(body["tasks"]) == 4
    interface = LabelInterface(body["label_config"])
    images = [fake_ls.uploads["1/e8198b09-cat_upload.png"], fake_ls.uploads["1/0de567ef-dog_url.png"],
              fake_ls.public["cat_upload.png"], fake_ls.public["dog_url.png"]]
    for entry, image in zip(results, images):
        assert set(entry) == {"result", "score", "model_version"}
        assert 0 <= entry["score"] <= 1 and entry["model_version"].startswith("rfclip-")
        expected = expected_label_map(tiny_model, image, ["cat", "dog"])
        h, w = expected.shape
        seen = np.zeros_like(expected, dtype=bool)
        for region in entry["result"]:
            assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert not interface.validate_prediction({"result": [region]}, return_errors=True)
            label = region["value"]["brushlabels"][0]
            mask = decode_brush(region)
            assert np.array_equal(mask, expected == ["cat", "dog"].index(label))
            assert not (seen & mask).any()
            seen |= mask
        assert seen.all()  # no threshold: every pixel belongs to a region
    # uploads were fetched from the LS host with the token
    private = [r for r in fake_ls.requests if "upload" in r["path"]]
    assert private and all(r["headers"].get("Authorization") == f"Token {TOKEN}" for r in private)


def test_each_request_logs_where_its_time_went(client, fake_ls, caplog):
    body = recorded_predict_body(fake_ls)
    with caplog.at_level("INFO", logger="rfclip.backend"):
        assert client.post("/predict", json=body).status_code == 200
    (record,) = [r for r in caplog.records if hasattr(r, "stage_seconds")]
    stages = record.stage_seconds
    assert {"text embeddings", "model", "labels at full size", "regions", "validation"} <= set(stages)
    assert all(t >= 0 for t in stages.values()) and stages["model"] > 0
    assert sum(stages.values()) <= record.seconds
    assert "4 of 4 predicted" in record.getMessage() and "model " in record.getMessage()


POLYGON_CONFIG = ('<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
                  '<Label value="left"/><Label value="right"/></PolygonLabels></View>')


def test_polygons_rasterize_back_to_the_mask(client, fake_ls, monkeypatch):
    # A controlled prediction: the left third is "left", the rest "right".
    import torch

    from rfclip_engine import predictor

    def halves(self, rgbs, vocabulary, timer, prototypes=None):
        h, w = rgbs[0].shape[:2]
        logits = torch.zeros(len(vocabulary), h, w)
        logits[0, :, : w // 3] = 1
        logits[1, :, w // 3:] = 1
        return [logits]

    monkeypatch.setattr(predictor.Segmenter, "logits_many", halves)
    fake_ls.public["p.png"] = png(90, 150)
    response = client.post("/predict", json={"tasks": [{"id": 7, "data": {"image": f"{fake_ls.url}/img/p.png"}}],
                                             "label_config": POLYGON_CONFIG})
    (entry,) = response.get_json()["results"]
    regions = entry["result"]
    assert sorted(r["value"]["polygonlabels"][0] for r in regions) == ["left", "right"]
    for region in regions:
        assert region["type"] == "polygonlabels"
        drawn = rasterize_polygon(region["value"]["points"], 150, 90)
        truth = np.zeros((90, 150), bool)
        if region["value"]["polygonlabels"] == ["left"]:
            truth[:, :50] = True
        else:
            truth[:, 50:] = True
        iou = (drawn & truth).sum() / (drawn | truth).sum()
        assert iou > 0.97
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in region["value"]["points"])
    assert entry["score"] == pytest.approx(2 / (1 + np.exp(-40)) - 1, abs=1e-4)  # the margin: top minus second


def test_interactive_request_shape(client, fake_ls):
    body = copy.deepcopy(SAMPLES["POST /predict (request, interactive: POST /api/ml/ID/interactive-annotating)"]["body"])
    fake_ls.uploads["1/e8198b09-cat_upload.png"] = png(60, 80)
    response = client.post("/predict", json=body)
    results = response.get_json()["results"]
    assert len(results) == len(body["tasks"]) and results[0]["result"]


def test_webhooks(client):
    annotation = SAMPLES["POST /webhook (request, ANNOTATION_CREATED)"]["body"]
    answer = client.post("/webhook", json=annotation).get_json()
    assert answer["status"] == "queued" and answer["events"] == 1  # learned from in the background
    assert client.post("/webhook", json={"action": "TASKS_CREATED"}).get_json()["status"] == "ignored"
    update = {"action": "PROJECT_UPDATED", "project": {"id": 5, "label_config": BRUSH_CONFIG}}
    assert client.post("/webhook", json=update).get_json()["status"] == "ok"


def test_project_updated_refreshes_the_config(client, fake_ls):
    fake_ls.public["a.png"] = png(64, 64)
    task = {"id": 1, "data": {"image": f"{fake_ls.url}/img/a.png"}}
    client.post("/setup", json={"project": "5.123", "schema": BRUSH_CONFIG})
    new_config = BRUSH_CONFIG.replace('value="dog"', 'value="horse"')
    client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 5, "label_config": new_config}})
    # a /predict without label_config uses the project's current one
    (entry,) = client.post("/predict", json={"tasks": [task], "project": "5.999"}).get_json()["results"]
    labels = {r["value"]["brushlabels"][0] for r in entry["result"]}
    assert labels <= {"cat", "horse"} and labels


def test_bad_requests(client):
    assert client.post("/predict", data="not json", content_type="application/json").status_code == 400
    assert client.post("/predict", json={"tasks": "x"}).status_code == 400
    response = client.post("/setup", json={"project": "1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert response.status_code == 400 and "BrushLabels" in response.get_json()["error"]
