"""Command line: build this project's tfds data sets (array_record, offline).

  python -m rethink_jax.data.build --data_dir=~/tensorflow_datasets --name=shapes_instances \
      --config=demo
  python -m rethink_jax.data.build --data_dir=... --name=coco_instances --config=2017 \
      --manual_dir=/data/coco
  python -m rethink_jax.data.build --data_dir=... --name=coco_instances --config=mine \
      --split=train:/d/train.json:/d/train_images --split=validation:/d/val.json:/d/val_images
"""

from absl import app
from absl import flags
import tensorflow_datasets as tfds

flags.DEFINE_string("data_dir", None, "tfds data dir to write to (default: tfds' default).")
flags.DEFINE_enum(
  "name",
  "coco_instances",
  ["coco_instances", "shapes_instances", "shapes_keypoints", "shapes_classification"],
  "data set.",
)
flags.DEFINE_string("config", None, "builder config (coco: 2017, folder, or a name for --split).")
flags.DEFINE_string("manual_dir", None, "manual_dir of coco_instances/2017 and /folder.")
flags.DEFINE_multi_string("split", [], "coco_instances: split:annotation_file:image_dir.")
flags.DEFINE_bool("skip_bad_images", False, "coco_instances: drop missing/corrupt images.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  tfds.disable_progress_bar()
  from rethink_jax.data import coco  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from rethink_jax.data import shapes_keypoints  # pylint: disable=g-import-not-at-top

  if FLAGS.name == "coco_instances" and FLAGS.split:
    splits = {}
    for spec in FLAGS.split:
      name, ann, img = spec.split(":", 2)
      splits[name] = (ann, img)
    builder = coco.build_coco_instances(
      FLAGS.data_dir, splits, name=FLAGS.config or "custom", skip_bad_images=FLAGS.skip_bad_images
    )
  else:
    cls = {
      "coco_instances": coco.CocoInstances,
      "shapes_instances": shapes.ShapesInstances,
      "shapes_keypoints": shapes_keypoints.ShapesKeypoints,
      "shapes_classification": shapes.ShapesClassification,
    }[FLAGS.name]
    builder = cls(config=FLAGS.config, data_dir=FLAGS.data_dir)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=FLAGS.manual_dir, try_download_gcs=False
      )
    )
  print(builder.info)
  if FLAGS.name == "coco_instances":
    print(next_steps(builder, FLAGS.data_dir))


def next_steps(builder, data_dir: str | None) -> str:
  """What was built (classes, split sizes) and the command that trains on it."""
  categories = builder.info.metadata["categories"]
  splits = ", ".join(f"{k} {v.num_examples} images" for k, v in sorted(builder.info.splits.items()))
  name = builder.builder_config.name
  data_flag = f" \\\n      --config.data.data_dir={data_dir}" if data_dir else ""
  return (
    f"{builder.info.full_name}: {len(categories)} classes "
    f"({', '.join(c['name'] for c in categories)}; category ids "
    f"{[c['id'] for c in categories]}); {splits}; dropped {builder.info.metadata['dropped']}.\n"
    f"Train on it:\n  python -m rethink_jax.main --config configs/custom_coco.py:{name} "
    f"--workdir runs/{name}{data_flag}"
  )


if __name__ == "__main__":
  app.run(main)
