"""What a run reports while it runs: metrics.jsonl, Ray dashboard metrics, TensorBoard, plots.

metrics.jsonl in the run directory is the record (plots are drawn from it); the Ray
metrics (``ray.util.metrics``, exported to the dashboard's Prometheus endpoint) and
TensorBoard are live views of the same numbers.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from spa_ray.pipeline.run_dir import RunDirectory

REPUBLISH_SECONDS = 5.0
_GAUGES = {
    "stage_progress": "Finished stages of the run",
    "tokens_per_second": "Generated tokens per second in the last generation call",
    "pairs_per_second": "Pairs labelled per second by the judges",
    "label_balance": "Fraction of pairs whose first sample was judged better",
    "tie_count": "Pairs dropped as ties by the judge",
    "noise_flag_rate": "Fraction of training pairs flagged as noisy (z = 1)",
    "train_loss": "Training loss of the last optimizer step",
    "judge_health": "Judge accuracy on held-out gold pairs",
    "win_rate": "Gold win rate over pi_init of the last evaluated policy",
}


class Telemetry:
    def __init__(self, run_dir: RunDirectory, run_name: str):
        self.dir = run_dir
        run_path = run_dir.path
        self.run_name = run_name
        self._gauges: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._republisher: threading.Thread | None = None
        self._finished = 0
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_path / "tensorboard"))
        except Exception:  # TensorBoard is a view; the run never depends on it
            self._tb = None
        self._tb_step = len([m for m in self.dir.read_metrics() if m.get("kind") == "train_step"])

    def gauge(self, name: str, value: float) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        with self._lock:
            self._last[name] = float(value)
        self._publish(name, float(value))
        if self._republisher is None:
            # Ray exports a gauge only in the interval it was set in; re-set the last values
            # so a stage's numbers stay on the dashboard while the next stage runs.
            self._republisher = threading.Thread(target=self._republish, daemon=True, name="spa-metrics")
            self._republisher.start()

    def _publish(self, name: str, value: float) -> None:
        try:
            from ray.util.metrics import Gauge

            if name not in self._gauges:
                self._gauges[name] = Gauge(f"spa_{name}", description=_GAUGES.get(name, name), tag_keys=("run",))
            self._gauges[name].set(value, tags={"run": self.run_name})
        except Exception:  # metrics are a view; the run never depends on them
            pass

    def _republish(self) -> None:
        while not self._closed.wait(REPUBLISH_SECONDS):
            with self._lock:
                last = dict(self._last)
            for name, value in last.items():
                self._publish(name, value)

    def stage(self, stage: str, **values: Any) -> None:
        self._finished += 1
        self.dir.append_metrics({"kind": "stage", "stage": stage, **values})
        self.gauge("stage_progress", self._finished)
        for key in ("label_balance", "noise_flag_rate", "judge_health", "win_rate"):
            if key in values:
                self.gauge(key, values[key])
        if "ties" in values:
            self.gauge("tie_count", values["ties"])
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{stage}/{key}", value, self._finished)
        print(f"spa-ray: stage {stage} done " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        ), flush=True)

    def train_step(self, stage: str, record: dict[str, Any]) -> None:
        self.dir.append_metrics({"kind": "train_step", **record, "stage": stage})
        self.gauge("train_loss", record.get("loss"))
        if self._tb is not None:
            for key in ("loss", "margin", "reward_accuracy", "z_rate", "lr"):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], self._tb_step)
        self._tb_step += 1

    def plots(self, rows: list[dict[str, Any]]) -> None:
        """plots/win_rate.png and plots/loss.png from the results rows and metrics.jsonl."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = self.dir.path / "plots"
        out.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [r["stage"] for r in rows]
        for key, label in (("win_rate", "gold win rate"), ("lc_win_rate", "LC win rate")):
            ax.plot(names, [r.get(key, math.nan) for r in rows], marker="o", label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("vs pi_init")
        ax.legend()
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        fig.savefig(out / "win_rate.png", dpi=100)
        plt.close(fig)

        steps = [m for m in self.dir.read_metrics() if m.get("kind") == "train_step"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for stage in dict.fromkeys(m["stage"] for m in steps):
            xs = [m for m in steps if m["stage"] == stage]
            ax.plot([m["step"] for m in xs], [m["loss"] for m in xs], label=stage)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        if steps:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        self._closed.set()
        if self._tb is not None:
            self._tb.close()
