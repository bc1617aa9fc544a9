"""python -m sdbatch.tiny_train --out DIR --minutes N: train the tiny family into DIR."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sdbatch.tiny_train.train import PARTS, Settings, train


def parse_pairs(text: str, kind: type) -> dict:
    pairs = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in PARTS or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: want PART=NUMBER, PART in {PARTS}")
        pairs[key] = kind(value)
    return pairs


def parse_steps(text: str) -> tuple[dict, dict]:
    """``vae=900,unet=7000:6500,controlnet=2062``: a part's step count, and where it
    stopped if cut short."""
    counts = parse_pairs(text, str)
    try:
        steps = {k: int(v.partition(":")[0]) for k, v in counts.items()}
        stop = {k: int(v.partition(":")[2]) for k, v in counts.items() if ":" in v}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: want PART=STEPS[:STOPPED_AT]") from e
    return steps, stop


def parse_set(items: list[str]) -> dict:
    """``key=value`` for any scalar field of Settings, converted to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        f = fields.get(key)
        default = f.default if f else None
        if f is None or isinstance(default, dataclasses._MISSING_TYPE):
            raise SystemExit(f"--set {item}: no scalar setting {key!r}")
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdbatch.tiny_train", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--minutes", type=float, default=Settings.minutes,
                   help="time budget for everything (default %(default)s)")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--threads", type=int, default=Settings.threads,
                   help="torch threads; at most the free cores (default %(default)s)")
    p.add_argument("--steps", type=parse_steps, default=({}, {}),
                   help="fixed step counts, e.g. vae=900,unet=7000,lora=1200,ti=600,"
                        "controlnet=2062 "
                        "(as train_settings.json's command has them): replays a run, no clock")
    p.add_argument("--shares", type=lambda s: parse_pairs(s, float), default=None,
                   help="budget shares, e.g. unet=0.5 (default: "
                        + ",".join(f"{k}={v}" for k, v in Settings().shares.items()) + ")")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="any other setting of sdbatch.tiny_train.train.Settings")
    p.add_argument("--no-samples", action="store_true", help="skip samples.png")
    args = p.parse_args(argv)
    settings = Settings(minutes=args.minutes, seed=args.seed, threads=args.threads,
                        steps=args.steps[0], stop=args.steps[1], samples=not args.no_samples,
                        **parse_set(args.set))
    if args.shares:
        settings.shares.update(args.shares)
    record = train(args.out, settings)
    report = record["report"]
    for part in PARTS:
        r = report[part]
        if "reused" in r:
            print(f"{part}: reused from {r['reused']}")
            continue
        print(f"{part}: {r['steps_done']} steps, {r['steps_per_s']} steps/s, "
              f"loss {r['final_loss']:.4f}")
    print(f"total {report['total_s']} s; replay: {record['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
