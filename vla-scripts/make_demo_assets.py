"""Write the demo assets under --out: rlds/ (synthetic LIBERO-90), model/ (tiny random OpenVLA), anchor_cache/.

    python vla-scripts/make_demo_assets.py --out data/demo [--force true]
"""

import draccus

from prismatic.demo import DemoAssetsConfig, make_demo_assets

if __name__ == "__main__":
    make_demo_assets(draccus.parse(DemoAssetsConfig))
