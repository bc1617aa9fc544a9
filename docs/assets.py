"""Draw the job assets that ship in jobs/assets/ (run from the repository root):

    python docs/assets.py
"""

from pathlib import Path

from PIL import Image

from sdbatch.tiny_train.scenes import Scene, draw, lawn_mask

# the composition lego_building's canny unit holds: a wide three-storey block on the left
# with a pointed roof (the prompts name colours and storeys, never the position)
BUILDING = Scene(colour="white", position="left", storeys=3, wide=True, roof="pointed", seed=3)

if __name__ == "__main__":
    out = Path("jobs/assets")
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lawn_mask(128)).save(out / "lawn_mask.png")
    Image.fromarray(draw(BUILDING, 64).image).save(out / "building_left.png")
    print(f"wrote {out / 'lawn_mask.png'}, {out / 'building_left.png'}")
