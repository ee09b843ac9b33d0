"""Records what kohya's OWN dataset code decides, as JSON fixtures for sdbooth-data's parity test.

For each case it builds an image set (tiny 1-bit PNGs: only their sizes matter), runs kohya's
config_util / train_util exactly as train_db.py does (BlueprintGenerator + ConfigSanitizer,
generate_dataset_group_by_blueprint, which calls make_buckets), and writes what a user would
notice: each image's bucket and resized size, repeats after reg balancing, bucket counts,
batches per epoch and the step/epoch arithmetic. Batch order is not recorded (Python's RNG).

Usage (kohya sources from `git archive` of kohya-ss/sd-scripts, needs torch, torchvision,
diffusers, transformers, accelerate, voluptuous, opencv-python-headless, imagesize, toml):
    tools/.venv/bin/python tools/kohya_dataset/make_fixtures.py /path/to/sd-scripts
Output: crates/sdbooth-data/tests/fixtures/kohya_dataset/<case>/ (images + kohya.json).
"""

import argparse
import json
import math
import os
import shutil
import sys
from fractions import Fraction

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(REPO, "crates", "sdbooth-data", "tests", "fixtures", "kohya_dataset")


def png(path, w, h):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("1", (w, h), 1).save(path, optimize=True)


def images(case_dir, sub, sizes, prefix="img"):
    for i, (w, h) in enumerate(sizes):
        png(os.path.join(case_dir, sub, f"{prefix}_{i:03d}.png"), w, h)


def tie_sizes(resos):
    """Image sizes whose aspect ratio is exactly midway between two neighbouring bucket ratios."""
    ars = sorted(set(Fraction(w, h) for w, h in resos))
    out = []
    for a, b in zip(ars, ars[1:]):
        mid = (a + b) / 2
        w, h = mid.numerator, mid.denominator
        k = max(1, math.ceil(300 / max(w, h)))
        if max(w, h) * k <= 2400:
            out.append((w * k, h * k))
    return out


def options_to_argv(opts):
    argv = []
    for k, v in opts.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is False or v is None:
            continue
        else:
            argv += [f"--{k}", str(v)]
    return argv


def run_kohya(case_dir, opts, config):
    from library import config_util, train_util, custom_train_functions
    from library.config_util import BlueprintGenerator, ConfigSanitizer

    parser = argparse.ArgumentParser()
    train_util.add_sd_models_arguments(parser)
    train_util.add_dataset_arguments(parser, True, False, True)
    train_util.add_training_arguments(parser, True)
    train_util.add_masked_loss_arguments(parser)
    config_util.add_config_arguments(parser)
    custom_train_functions.add_custom_train_arguments(parser)
    argv = options_to_argv(opts)
    if config:
        argv += ["--dataset_config", config]
    args = parser.parse_args(argv)
    train_util.prepare_dataset_args(args, False)

    cwd = os.getcwd()
    os.chdir(case_dir)
    try:
        gen = BlueprintGenerator(ConfigSanitizer(True, False, args.masked_loss, True))
        if config:
            user_config = config_util.load_user_config(config)
        else:
            user_config = {
                "datasets": [
                    {"subsets": config_util.generate_dreambooth_subsets_config_by_subdirs(args.train_data_dir, args.reg_data_dir)}
                ]
            }
        blueprint = gen.generate(user_config, args)
        group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    finally:
        os.chdir(cwd)

    datasets = []
    for ds in group.datasets:
        imgs = []
        for key, info in ds.image_data.items():
            imgs.append(
                {
                    "path": os.path.normpath(key),
                    "size": list(info.image_size),
                    "bucket": list(info.bucket_reso),
                    "resized_size": list(info.resized_size),
                    "num_repeats": info.num_repeats,
                    "is_reg": info.is_reg,
                    "caption": info.caption,
                }
            )
        buckets = [
            [reso[0], reso[1], len(b)] for reso, b in zip(ds.bucket_manager.resos, ds.bucket_manager.buckets) if len(b) > 0
        ]
        datasets.append(
            {
                "images": sorted(imgs, key=lambda x: x["path"]),
                "buckets": buckets,
                "num_train_images": ds.num_train_images,
                "num_reg_images": ds.num_reg_images,
                "batches_per_epoch": len(ds),
                "subset_image_counts": [s.img_count for s in ds.subsets],
            }
        )
    batches = len(group)
    # train_db.py's arithmetic (DataLoader batch_size=1 over the group, one process).
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * math.ceil(batches / 1 / args.gradient_accumulation_steps)
    per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    return {
        "datasets": datasets,
        "batches_per_epoch": batches,
        "max_train_steps": args.max_train_steps,
        "num_epochs": math.ceil(args.max_train_steps / per_epoch),
    }


def write_toml(case_dir, text):
    with open(os.path.join(case_dir, "dataset.toml"), "w") as f:
        f.write(text)


def cases():
    from library import model_util

    out = []

    def case(name, opts, toml_text=None, build=None):
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        if build:
            build(d)
        if toml_text:
            write_toml(d, toml_text)
        out.append((name, d, opts, "dataset.toml" if toml_text else None))

    varied = [(512, 512), (640, 480), (480, 640), (1024, 768), (300, 200), (200, 300), (1920, 1080), (1080, 1920),
              (800, 800), (256, 1024), (1000, 333), (333, 1000), (700, 500), (64, 64), (513, 511), (4000, 3000)]

    case(
        "bucket_no_upscale",
        {"max_train_steps": 100},
        '[general]\nenable_bucket = true\nbucket_no_upscale = true\nresolution = 512\nbatch_size = 2\n\n'
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "train"\n  num_repeats = 2\n  class_tokens = "sks dog"\n',
        lambda d: images(d, "train", varied + [(130, 70), (2000, 900), (600, 1200)]),
    )
    case(
        "nonsquare_768x512",
        {"max_train_epochs": 3, "gradient_accumulation_steps": 2},
        '[general]\nenable_bucket = true\n\n[[datasets]]\nresolution = [768, 512]\nbatch_size = 3\n'
        '  [[datasets.subsets]]\n  image_dir = "train"\n  num_repeats = 3\n',
        lambda d: images(d, "train", varied),
    )
    resos = model_util.make_bucket_resolutions((512, 512), 256, 1024, 64)
    ties = tie_sizes(resos) + [r for r in resos][::3]
    case(
        "aspect_ties",
        {"resolution": "512", "enable_bucket": True, "max_train_steps": 50},
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "train"\n',
        lambda d: images(d, "train", ties),
    )
    case(
        "reg_more_than_train",
        {"resolution": "256", "enable_bucket": True, "min_bucket_reso": 128, "max_bucket_reso": 512},
        '[[datasets]]\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = "train"\n  num_repeats = 3\n'
        '  class_tokens = "sks dog"\n\n  [[datasets.subsets]]\n  image_dir = "reg"\n  is_reg = true\n  class_tokens = "dog"\n',
        lambda d: (images(d, "train", [(300, 200), (200, 300)]), images(d, "reg", varied[:10], "reg")),
    )
    case(
        "reg_fewer_than_train",
        {"resolution": "256", "enable_bucket": True, "min_bucket_reso": 128, "max_bucket_reso": 512},
        '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "train"\n  num_repeats = 5\n  class_tokens = "sks dog"\n\n'
        '  [[datasets.subsets]]\n  image_dir = "reg_a"\n  is_reg = true\n  class_tokens = "dog"\n\n'
        '  [[datasets.subsets]]\n  image_dir = "reg_b"\n  is_reg = true\n  num_repeats = 2\n  class_tokens = "dog"\n',
        lambda d: (
            images(d, "train", [(300, 200), (200, 300), (256, 256)]),
            images(d, "reg_a", [(400, 300), (300, 400)], "a"),
            images(d, "reg_b", [(500, 250)], "b"),
        ),
    )
    case(
        "legacy_folders",
        {"train_data_dir": "train", "reg_data_dir": "reg", "resolution": "256", "enable_bucket": True,
         "min_bucket_reso": 128, "max_bucket_reso": 512, "train_batch_size": 2},
        None,
        lambda d: (
            images(d, "train/5_sks dog", [(300, 200), (200, 300), (256, 256)], "a"),
            images(d, "train/2_other_thing", [(400, 100)], "b"),
            images(d, "train/notanumber", [(256, 256)], "c"),
            images(d, "train/0_zero", [(256, 256)], "z"),
            images(d, "reg/1_dog", [(256, 256), (320, 240), (240, 320), (512, 512)], "r"),
        ),
    )
    case(
        "two_datasets",
        {"max_train_steps": 30, "caption_extension": ".txt"},
        '[general]\nenable_bucket = true\nshuffle_caption = true\n\n'
        '[[datasets]]\nresolution = 512\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = "a"\n  num_repeats = 2\n'
        '  class_tokens = "sks"\n\n'
        '[[datasets]]\nresolution = [320, 256]\nbatch_size = 1\nmin_bucket_reso = 128\nmax_bucket_reso = 640\n'
        'bucket_reso_steps = 64\n  [[datasets.subsets]]\n  image_dir = "b"\n  class_tokens = "sks"\n'
        '  [[datasets.subsets]]\n  image_dir = "b_reg"\n  is_reg = true\n',
        lambda d: (
            images(d, "a", varied[:8]),
            images(d, "b", varied[8:]),
            images(d, "b_reg", [(256, 256), (500, 300)], "r"),
            open(os.path.join(d, "a", "img_000.txt"), "w").write("a caption from a txt file\n"),
        ),
    )
    case(
        "validation_split_seeded",
        {"resolution": "256", "enable_bucket": True, "min_bucket_reso": 128, "max_bucket_reso": 512},
        '[[datasets]]\nvalidation_split = 0.3\nvalidation_seed = 1234\n  [[datasets.subsets]]\n  image_dir = "train"\n'
        '  num_repeats = 2\n\n  [[datasets.subsets]]\n  image_dir = "reg"\n  is_reg = true\n',
        lambda d: (images(d, "train", varied[:11]), images(d, "reg", varied[11:], "r")),
    )
    toy = os.path.join(REPO, "examples", "toy")
    out.append(("toy", toy, {"max_train_steps": 200}, "dataset.toml"))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.path.insert(0, sys.argv[1])
    os.makedirs(OUT, exist_ok=True)
    for name, case_dir, opts, config in cases():
        result = run_kohya(case_dir, opts, config)
        result = {"case": name, "case_dir": os.path.relpath(case_dir, REPO), "options": opts, "config": config, **result}
        target = os.path.join(OUT, name)
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "kohya.json"), "w") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
        print(name, "batches/epoch", result["batches_per_epoch"], "buckets", [d["buckets"] for d in result["datasets"]])


if __name__ == "__main__":
    main()
