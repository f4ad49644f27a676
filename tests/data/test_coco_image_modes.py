"""coco_instances stores 3-channel 8-bit images whatever the files hold: tfds' NumPy reader
(builder.as_data_source, what grain users take) and tf.data return the same (H, W, 3) pixels for
RGBA / LA / palette / 16-bit PNGs, CMYK JPEGs and TIFFs (converted to RGB PNGs at build time), and
the 8-bit RGB and grayscale files are kept byte for byte (JPEGs: the two decoders agree to a few
levels)."""

import json

import numpy as np
from PIL import Image
import pytest


def _images(rng):
  """{file name: (PIL image, format, expected RGB pixels or None = lossy, compared loosely)}."""
  h, w = 24, 32
  rgb = rng.integers(0, 256, (h, w, 3), np.uint8)
  alpha = rng.integers(0, 256, (h, w), np.uint8)
  gray = rng.integers(0, 256, (h, w), np.uint8)
  gray16 = rng.integers(0, 65536, (h, w), np.uint16)
  palette = rng.integers(0, 256, (16, 3), np.uint8)
  index = rng.integers(0, 16, (h, w), np.uint8)
  p_img = Image.fromarray(index, "P")
  p_img.putpalette(palette.ravel().tolist())
  cmyk = rng.integers(0, 256, (h, w, 4), np.uint8)
  gray16_8 = np.clip(np.round(gray16 / 257.0), 0, 255).astype(np.uint8)
  cmyk_img = Image.fromarray(cmyk, "CMYK")
  # A photo-like (smooth) image for the JPEG kept as it is.
  yy, xx = np.mgrid[:h, :w]
  phase = rng.uniform(0, 6.3, 3)
  smooth = np.stack([128 + 100 * np.sin(xx / 7 + yy / 11 + p) for p in phase], -1).astype(np.uint8)
  return {
    "rgb.png": (Image.fromarray(rgb, "RGB"), "PNG", rgb),
    "gray.png": (Image.fromarray(gray, "L"), "PNG", np.repeat(gray[..., None], 3, -1)),
    "rgb.jpg": (Image.fromarray(smooth, "RGB"), "JPEG", None),
    "rgba.png": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG", rgb),
    "la.png": (Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG", np.dstack([gray] * 3)),
    "palette.png": (p_img, "PNG", palette[index]),
    "gray16.png": (Image.fromarray(gray16), "PNG", np.dstack([gray16_8] * 3)),
    "cmyk.jpg": (cmyk_img, "JPEG", None),
    "rgb.tif": (Image.fromarray(rgb, "RGB"), "TIFF", rgb),
  }


def test_both_readers_return_the_same_rgb_pixels(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  rng = np.random.default_rng()
  root = tmp_path / "coco"
  (root / "images").mkdir(parents=True)
  files = _images(rng)
  images, anns = [], []
  for i, (name, (im, fmt, _)) in enumerate(sorted(files.items()), 1):
    im.save(root / "images" / name, format=fmt)
    images.append({"id": i, "file_name": name, "height": im.height, "width": im.width})
    anns.append(
      {
        "id": 100 + i,
        "image_id": i,
        "category_id": 1,
        "iscrowd": 0,
        "area": 64.0,
        "bbox": [2.0, 2.0, 8.0, 8.0],
        "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]],
      }
    )
  with Image.open(root / "images" / "gray16.png") as im:
    assert im.mode.startswith("I"), im.mode  # a real 16-bit file
  with Image.open(root / "images" / "cmyk.jpg") as im:
    assert im.mode == "CMYK"
    cmyk_rgb = np.asarray(im.convert("RGB"))
  gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
  (root / "instances.json").write_text(json.dumps(gt))
  builder = coco.build_coco_instances(
    str(tmp_path / "tfds"), {"train": (root / "instances.json", root / "images")}, name="modes"
  )

  by_numpy = {
    r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]: r["image"]
    for r in (builder.as_data_source("train")[i] for i in range(len(files)))
  }
  # The training pipeline's way: serialized records decoded by the features in TensorFlow.
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

  paths = [str(p) for p in builder.info.splits["train"].filepaths]
  source = array_record_data_source.ArrayRecordDataSource(paths)
  by_tf = {}
  for i in range(len(source)):
    r = builder.info.features.deserialize_example(source[i])
    by_tf[r["file_name"].numpy().decode()] = r["image"].numpy()
  assert sorted(by_numpy) == sorted(by_tf) == sorted(files)
  for name, (im, _, expected) in files.items():
    a, b = by_numpy[name], by_tf[name]
    assert a.shape == b.shape == (im.height, im.width, 3), (name, a.shape, b.shape)
    assert a.dtype == b.dtype == np.uint8, name
    if name == "rgb.jpg":
      # Kept as it is (re-encoding COCO's JPEGs losslessly would multiply its size): PIL's and
      # TensorFlow's JPEG decoders differ by a few levels (chroma upsampling, IDCT rounding).
      diff = np.abs(a.astype(int) - b.astype(int))
      assert diff.max() <= 4 and diff.mean() < 1.5, (name, diff.max(), diff.mean())
      continue
    np.testing.assert_array_equal(a, b, err_msg=name)
    if name == "cmyk.jpg":
      expected = cmyk_rgb  # lossy: the pixels PIL decodes, as RGB
    np.testing.assert_array_equal(a, expected, err_msg=name)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eight_bit_rgb_and_grayscale_files_are_kept_byte_for_byte(tmp_path, mode):
  from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng()
  shape = (10, 12, 3) if mode == "RGB" else (10, 12)
  for fmt in ("PNG", "JPEG"):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode).save(path, format=fmt)
    data = path.read_bytes()
    with Image.open(path) as im:
      assert coco.rgb_image_bytes(im, data) is data
