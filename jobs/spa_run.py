"""Entry point of the SPA Ray job.

Locally:        python jobs/spa_run.py [--config FILE] [key.sub=value ...]
On a cluster:   ray job submit --working-dir . -- python jobs/spa_run.py --config clusters/presets/...
All logic lives in spa_ray.pipeline; this file only hands over the arguments.
"""

import sys
from pathlib import Path

# Inside `ray job submit --working-dir .` the package is importable from the working dir.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spa_ray.pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
