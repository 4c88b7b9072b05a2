"""The recognizer server (vit_jax.serve) as users meet it: a subprocess on a free port serving a
tiny trained model, its web page in headless Chromium, its JSON API with good and bad uploads,
batching of concurrent clients, and the torch / ONNX backends against the JAX one."""

import concurrent.futures
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from tests.image_folders import write_colour_folder
from vit_jax import predict
from vit_jax.serve import backends as serve_backends
from vit_jax.serve import batching as serve_batching

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
COLOURS = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def workdir(folder, tmp_path_factory):
  """The `testing` model trained on the colour folder (test accuracy 1.0 in 12 steps)."""
  from configs import testing  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top

  config = testing.get_config()
  with config.unlocked():  # one evaluation and one checkpoint: the end is all the tests need
    config.update(dataset=folder, eval_every=12, checkpoint_every=12, progress_every=12)
  out = str(tmp_path_factory.mktemp("serve") / "run")
  assert train.train_and_evaluate(config, out)["test_accuracy"] == 1.0
  return out


def _photo(folder: str, colour: str, i: int = 0) -> str:
  return os.path.join(folder, "test", colour, f"{i}.jpg")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one real CPU device


def _serve(*args: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "vit_jax.serve", *args],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


@pytest.fixture(scope="module")
def examples(folder, tmp_path_factory):
  """Sample photos for the page: one per colour, named after it."""
  out = tmp_path_factory.mktemp("examples")
  for colour in COLOURS:
    shutil.copy(_photo(folder, colour, 3), out / f"{colour}.jpg")
  return str(out)


@pytest.fixture(scope="module")
def server(workdir, examples):
  """(base URL, the /healthz status codes seen while it started)."""
  yield from _running("--checkpoint", workdir, "--examples", examples)


def _running(*args: str):
  """Starts the server with `args` (--max_batch 8, --max_upload_mb 1); yields (URL, the
  /healthz status codes seen while it started) and stops it."""
  port = _free_port()
  proc = _serve(*args, "--port", str(port), "--max_batch", "8", "--max_upload_mb", "1")
  url, seen = f"http://127.0.0.1:{port}", []
  deadline = time.monotonic() + 240
  try:
    while time.monotonic() < deadline:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      try:
        seen.append(requests.get(url + "/healthz", timeout=5).status_code)
      except requests.ConnectionError:
        pass  # not listening yet: the model is loading
      if seen and seen[-1] == 200:
        break
      time.sleep(0.05)
    assert seen and seen[-1] == 200, f"not ready in time: {seen[-5:]}"
    yield url, seen
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def _post(url: str, *paths_or_files) -> requests.Response:
  files = []
  for item in paths_or_files:
    if isinstance(item, str):
      with open(item, "rb") as f:
        item = (os.path.basename(item), f.read())
    files.append(("file", item))
  return requests.post(url + "/api/predict", files=files, timeout=60)


def _png_header(width: int, height: int) -> bytes:
  """A PNG that declares width x height RGB pixels and holds almost none: a decompression bomb's
  header."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", ihdr)
    + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    + chunk(b"IEND", b"")
  )


# --- Start-up ------------------------------------------------------------------------------------


def test_healthz_is_503_while_warming_then_200_with_the_model_name(server):
  url, seen = server
  assert 503 in seen and seen.index(503) < seen.index(200)
  assert requests.get(url + "/healthz", timeout=5).json()["model_name"] == "testing"


@pytest.mark.parametrize("bad", ["missing", "corrupt.npz"])
def test_bad_checkpoint_is_one_error_line_and_exit_2(tmp_path, bad):
  path = tmp_path / bad
  if bad == "corrupt.npz":
    path.write_bytes(b"PK\x03\x04 not really a zip")
  proc = _serve("--checkpoint", str(path), "--port", str(_free_port()))
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert err.startswith("error: ") and err.strip().count("\n") == 0 and str(path) in err


# --- The page ------------------------------------------------------------------------------------


@pytest.mark.skipif(
  not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
  reason="chromium / chromedriver not installed (apt-get install chromium "
  "chromium-driver, as scripts/setup.sh does)",
)
def test_page_shows_the_class_of_an_uploaded_photo(server, folder, tmp_path):
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import expected_conditions  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900"):
    options.add_argument(arg)
  driver = webdriver.Chrome(
    options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
  )
  try:
    driver.get(server[0] + "/")
    WebDriverWait(driver, 30).until(
      expected_conditions.text_to_be_present_in_element((By.ID, "model"), "testing")
    )
    assert "blue, green, red" in driver.find_element(By.ID, "classes").text
    assert driver.find_element(By.ID, "runtime").text == "served by jax, fp32"
    driver.find_element(By.ID, "file").send_keys(_photo(folder, "green"))
    WebDriverWait(driver, 30).until(
      expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#results .label"))
    )
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .label")]
    probs = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .prob")]
    WebDriverWait(driver, 30).until(
      lambda d: d.execute_script(
        "const a = document.getElementById('attention');"
        "return a.complete && a.naturalWidth > 0 && a.style.display !== 'none';"
      )
    )
    kind = driver.find_element(By.ID, "attention_kind").text
    driver.save_screenshot(str(tmp_path / "recognizer.png"))
    driver.find_element(By.CSS_SELECTOR, 'img.example[alt="blue.jpg"]').click()
    WebDriverWait(driver, 30).until(
      expected_conditions.text_to_be_present_in_element((By.ID, "status"), "blue.jpg")
    )
    WebDriverWait(driver, 30).until(
      lambda d: (
        d.find_elements(By.CSS_SELECTOR, "#results .label")
        and d.find_elements(By.CSS_SELECTOR, "#results .label")[0].text == "blue"
      )
    )
  finally:
    driver.quit()
  assert labels[0] == "green" and sorted(labels) == COLOURS
  assert probs[0].endswith("%") and float(probs[0][:-1]) > 50
  assert "attention rollout from the class token" in kind
  assert (tmp_path / "recognizer.png").stat().st_size > 1000


# --- The API -------------------------------------------------------------------------------------


def test_api_answers_in_upload_order_as_offline_predict(server, folder, workdir):
  paths = [_photo(folder, c, 1) for c in ("red", "blue", "green", "red")]
  response = _post(server[0], *paths)
  assert response.status_code == 200
  got = response.json()["predictions"]
  want = predict.predict(workdir, paths, top_k=3)["predictions"]
  assert [p[0]["label"] for p in got] == ["red", "blue", "green", "red"]
  for g, w in zip(got, want):
    assert [t["label"] for t in g] == [t["label"] for t in w["top_k"]]
    np.testing.assert_allclose(
      [t["probability"] for t in g], [t["probability"] for t in w["top_k"]], atol=1e-5
    )


def test_sample_photos_are_served_by_name_only(server, examples):
  url = server[0]
  assert requests.get(url + "/api/info", timeout=10).json()["examples"] == [
    "blue.jpg",
    "green.jpg",
    "red.jpg",
  ]
  with open(os.path.join(examples, "red.jpg"), "rb") as f:
    assert requests.get(url + "/examples/red.jpg", timeout=10).content == f.read()
  for name in ("..%2F..%2Fetc%2Fpasswd", "missing.jpg"):
    response = requests.get(f"{url}/examples/{name}", timeout=10)
    assert response.status_code == 404 and b"root:" not in response.content


def test_attention_api_overlays_the_rollout_on_the_photo(server, folder, workdir):
  from vit_jax import attention  # pylint: disable=g-import-not-at-top

  path = _photo(folder, "red", 1)
  with open(path, "rb") as f:
    response = requests.post(
      server[0] + "/api/attention", files={"file": ("red.jpg", f.read())}, timeout=60
    )
  assert response.status_code == 200 and response.headers["content-type"] == "image/png"
  picture = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), np.float32)
  predictor = predict.Predictor(workdir)
  image = predict.preprocess(predict.load_rgb(path), predictor.image_size)
  heat = attention.attention_maps(predictor.model, predictor.params, image[None])[0]
  scale = picture.shape[0] // heat.shape[0]
  assert scale >= 1 and picture.shape[:2] == (heat.shape[0] * scale, heat.shape[1] * scale)
  # The photo in grey, the map added to red alone: red - green is the map, to uint8 rounding.
  red_minus_green = (picture[..., 0] - picture[..., 1])[::scale, ::scale] / 255
  np.testing.assert_allclose(red_minus_green, heat, atol=0.01)
  assert heat.max() == 1.0 and heat.min() < 1.0  # a map, not a constant


BAD_UPLOADS = {
  "not_an_image": (b"plain text, not a photo\n", 400, "not an image"),
  "truncated": (None, 400, "truncated"),  # the first 40 bytes of a real JPEG
  "empty": (b"", 400, "empty file"),
  "bomb_over_pil_limit": (_png_header(100_000, 100_000), 400, "decompression bomb"),
  "bomb_over_server_limit": (_png_header(7_000, 7_000), 400, "decompression bomb"),
  "over_max_upload_mb": (os.urandom(1_100_000), 413, "larger than the limit of 1 MB"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_4xx_naming_the_problem_and_the_next_is_right(server, folder, case):
  data, status, words = BAD_UPLOADS[case]
  if data is None:
    with open(_photo(folder, "red"), "rb") as f:
      data = f.read()[:40]
  response = _post(server[0], (f"{case}.jpg", data))
  assert response.status_code == status
  error = response.json()["error"]
  assert f"{case}.jpg" in error and words in error, error
  after = _post(server[0], _photo(folder, "blue", 2))
  assert after.status_code == 200 and after.json()["predictions"][0][0]["label"] == "blue"


def test_a_request_without_a_file_field_is_a_400(server):
  response = requests.post(server[0] + "/api/predict", files={"photo": ("x.jpg", b"x")}, timeout=30)
  assert response.status_code == 400 and "'file'" in response.json()["error"]


def test_concurrent_clients_share_forward_passes(server, folder):
  url = server[0]
  paths = [_photo(folder, COLOURS[i % 3], i % 7) for i in range(24)]
  before = requests.get(url + "/healthz", timeout=5).json()["forward_passes"]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    responses = list(pool.map(lambda p: _post(url, p), paths))
  passes = requests.get(url + "/healthz", timeout=5).json()["forward_passes"] - before
  assert [r.json()["predictions"][0][0]["label"] for r in responses] == [
    COLOURS[i % 3] for i in range(24)
  ]
  assert passes < len(paths)  # several requests per forward pass


# --- Batching ------------------------------------------------------------------------------------


def test_batcher_pads_to_buckets_and_returns_each_request_its_rows():
  import asyncio  # pylint: disable=g-import-not-at-top

  sizes = []

  def model(x):
    sizes.append(len(x))
    return x.reshape(len(x), -1)[:, :1] * 2

  batcher = serve_batching.Batcher(model, max_batch=4, window_s=0.05)

  async def run():
    requests_ = [np.full((n, 1), i, np.float32) for i, n in enumerate((3, 1, 6))]
    return await asyncio.gather(*(batcher.predict(r) for r in requests_))

  out = asyncio.run(run())
  batcher.close()
  assert [o[:, 0].tolist() for o in out] == [[0, 0, 0], [2], [4] * 6]
  assert set(sizes) <= {1, 2, 4} and sum(sizes) >= 10  # 3+1 | 4 | 2 (6 split into 4 + 2)


# --- Other backends ------------------------------------------------------------------------------


def test_torch_and_onnx_exports_serve_the_same_probabilities(workdir, folder, tmp_path):
  from vit_jax import convert  # pylint: disable=g-import-not-at-top

  images = np.stack([predict.preprocess(predict.load_rgb(_photo(folder, c)), 32) for c in COLOURS])
  want = serve_backends.load_backend("jax", workdir)(images)
  for fmt, kind in (("timm", "torch"), ("onnx", "onnx")):
    out = str(tmp_path / fmt)
    convert.convert(workdir, out, fmt)
    backend = serve_backends.load_backend(kind, out)
    assert backend.class_names == COLOURS and backend.image_size == 32, kind
    assert backend.model_name == "testing", kind
    np.testing.assert_allclose(backend(images), want, atol=1e-5, err_msg=kind)
  shutil.rmtree(tmp_path / "timm")
  with pytest.raises(serve_backends.BackendError, match="no such checkpoint"):
    serve_backends.load_backend("torch", str(tmp_path / "timm"))


# --- int8 ONNX -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_export(workdir, tmp_path_factory):
  """(folder with model.onnx and model.int8.onnx, the conversion result)."""
  from vit_jax import convert  # pylint: disable=g-import-not-at-top

  out = str(tmp_path_factory.mktemp("int8") / "onnx")
  return out, convert.convert(workdir, out, "onnx", int8=convert.Int8Options())


def test_int8_export_is_measured_on_the_test_split_and_keeps_the_metadata(int8_export):
  from vit_jax import convert  # pylint: disable=g-import-not-at-top

  out, result = int8_export
  measured = result.int8
  assert measured["count"] == 21 and measured["split"] == "test"  # the colour folder's test
  assert measured["float_accuracy"] == 100.0 and measured["int8_accuracy"] == 100.0
  assert measured["top1_agreement"] == 100.0 and 0 < measured["max_probability_difference"] < 0.05
  fp32 = convert.read_onnx_metadata(os.path.join(out, convert.ONNX_FILE))
  int8 = convert.read_onnx_metadata(os.path.join(out, convert.ONNX_INT8_FILE))
  assert fp32["precision"] == "fp32" and int8["precision"] == "int8"
  assert {k: int8[k] for k in fp32 if k != "precision"} == {
    k: v for k, v in fp32.items() if k != "precision"
  }
  assert int8["class_names"] == COLOURS
  assert int8["quantization"] == measured.pop("quantization") and int8["int8"] == measured
  assert int8["quantization"]["method"] == "dynamic"


def test_onnx_backend_serves_int8_when_present_and_precision_chooses(int8_export, folder):
  out, _ = int8_export
  images = np.stack([predict.preprocess(predict.load_rgb(_photo(folder, c)), 32) for c in COLOURS])
  int8 = serve_backends.load_backend("onnx", out)
  fp32 = serve_backends.load_backend("onnx", out, precision="fp32")
  assert int8.precision == "int8" and fp32.precision == "fp32"
  np.testing.assert_array_equal(int8(images).argmax(-1), [0, 1, 2])
  np.testing.assert_allclose(int8(images), fp32(images), atol=0.05)
  assert np.abs(int8(images) - fp32(images)).max() > 0  # really another model
  os.rename(os.path.join(out, "model.int8.onnx"), os.path.join(out, "aside.onnx"))
  try:
    assert serve_backends.load_backend("onnx", out).precision == "fp32"
    with pytest.raises(serve_backends.BackendError, match="no model.int8.onnx"):
      serve_backends.load_backend("onnx", out, precision="int8")
  finally:
    os.rename(os.path.join(out, "aside.onnx"), os.path.join(out, "model.int8.onnx"))
  with pytest.raises(serve_backends.BackendError, match="int8 is the onnx backend"):
    serve_backends.load_backend("jax", out, precision="int8")


def test_threads_reach_the_session_options(int8_export):
  out, _ = int8_export
  options = serve_backends.load_backend("onnx", out, threads=1)._session.get_session_options()
  assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
  default = serve_backends.load_backend("onnx", out)._session.get_session_options()
  assert default.intra_op_num_threads == len(os.sched_getaffinity(0))
  with pytest.raises(serve_backends.BackendError, match="JAX sizes its own"):
    serve_backends.load_backend("jax", out, threads=2)


def test_accuracy_gate_refuses_an_int8_model_that_loses_accuracy_and_writes_nothing(
  workdir, folder, tmp_path
):
  """Noise photos labelled with the float model's own answers: float scores 100 %, and each
  answer int8 flips (near-ties; 4 of 400 here) costs it accuracy, so drop 0 must refuse."""
  from vit_jax import convert  # pylint: disable=g-import-not-at-top

  noise = tmp_path / "noise"
  shutil.copytree(os.path.join(folder, "train"), noise / "train")
  pixels = np.random.default_rng(0).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
  convert.convert(workdir, str(tmp_path / "fp32"), "onnx")
  answers = serve_backends.load_backend("onnx", str(tmp_path / "fp32"))(
    np.stack([predict.preprocess(p, 32) for p in pixels])
  ).argmax(-1)
  for i, (image, answer) in enumerate(zip(pixels, answers)):
    (noise / "test" / COLOURS[answer]).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(noise / "test" / COLOURS[answer] / f"{i}.png")
  options = convert.Int8Options(dataset=str(noise), max_accuracy_drop=0)
  out = tmp_path / "int8"
  with pytest.raises(convert.AccuracyDropError) as e:
    convert.convert(workdir, str(out), "onnx", int8=options)
  assert "against float 100.00 % on 400 test images" in str(e.value), e.value
  assert "nothing written" in str(e.value) and not out.exists()
  relaxed = convert.Int8Options(dataset=str(noise), max_accuracy_drop=5)
  assert convert.convert(workdir, str(out), "onnx", int8=relaxed).int8["float_accuracy"] == 100


def _convert_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", "convert_to_pytorch.py"), *args],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_int8_cli_gate_and_data_errors_are_one_line(workdir, tmp_path):
  no_run = tmp_path / "copy"
  no_run.mkdir()
  for name in ("params.npz", "params.json"):
    shutil.copy(os.path.join(workdir, name), no_run / name)
  cases = [
    (["--checkpoint", str(no_run / "params.npz")], 2, "no run.json"),
    (["--checkpoint", workdir, "--max_accuracy_drop", "-1"], 2, "--max_accuracy_drop"),
  ]
  for args, code, words in cases:
    proc = _convert_cli(*args, "--format", "onnx", "--int8", "--output", str(tmp_path / "o"))
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and words in proc.stderr
    assert not (tmp_path / "o").exists()
  proc = _convert_cli(
    "--checkpoint", workdir, "--format", "timm", "--output", "x", "--int8_method", "static"
  )
  assert proc.returncode == 2 and "--int8_method needs --int8" in proc.stderr


@pytest.fixture(scope="module")
def int8_server(int8_export):
  yield from _running("--checkpoint", int8_export[0], "--backend", "onnx")


def test_int8_server_says_so_and_answers_like_the_others(int8_server, folder):
  url, _ = int8_server
  info = requests.get(url + "/api/info", timeout=10).json()
  assert (info["backend"], info["precision"]) == ("onnx", "int8")
  for colour in COLOURS:
    assert _post(url, _photo(folder, colour, 4)).json()["predictions"][0][0]["label"] == colour
  for case, (data, status, words) in BAD_UPLOADS.items():
    if data is None:
      with open(_photo(folder, "red"), "rb") as f:
        data = f.read()[:40]
    response = _post(url, (f"{case}.jpg", data))
    assert response.status_code == status and words in response.json()["error"], case
