"""Draw the job assets that ship in jobs/assets/ (run from the repository root):

    python docs/assets.py
"""

from pathlib import Path

from PIL import Image

from sdbatch.tiny_train.scenes import lawn_mask

if __name__ == "__main__":
    out = Path("jobs/assets")
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lawn_mask(128)).save(out / "lawn_mask.png")
    print(f"wrote {out / 'lawn_mask.png'}")
