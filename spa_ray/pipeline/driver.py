"""The driver: Algorithm 1 of SPA, one stage at a time, over Ray actors.

    pi_0 <- DPO(pi_init, D0)
    for t in 1..T:
        y1, y2 ~ pi_{t-1}(.|x) for x in X_t            generators
        label the pair by Eq. 7-8 (pi_{t-1} vs pi_init)  judges
        audit a random sample of the labels; stop if bad auditor (gold judge, a function, a file)
        pi_t <- refined DPO from pi_{t-1} (Eq. 9-12)     Ray Train group
        broadcast pi_t to generators and judges

Every stage writes into the run directory under a temporary name and is recorded in the
ledger when complete, so rerunning the same command resumes after the last finished
stage. The stage bodies live in ``stages.py``; this file is only the order of things.
"""

from __future__ import annotations

import sys

from spa_ray.pipeline.config import SPAConfig
from spa_ray.pipeline.label_audit import LabelAuditError
from spa_ray.pipeline.stages import (
    JudgeHealthError,
    Run,
    audit_labels,
    check_judge_health,
    evaluate,
    generate_responses,
    judge_pairs,
    prepare_data,
    prepare_judge_model,
    print_final_table,
    train_policy,
)


def run_spa(config: SPAConfig) -> int:
    """Run (or resume) SPA as configured; returns the process exit code."""
    with Run.open(config) as run:
        data = prepare_data(run)                                  # splits, gold seed pairs D0, held-out gold pairs
        run.start_trainer_early()                                 # the Ray Train group starts while pi_init is evaluated
        evaluate(run, policy=run.pi_init, version=0, name="init")  # pi_init's samples: the win-rate baseline

        pi_prev = train_policy(run, t=0, policy=run.pi_init, pairs=data.seed_pairs)  # pi_0 <- DPO(pi_init, D0)
        evaluate(run, policy=pi_prev, version=1, name="pi_0")
        if config.run.iterations:
            prepare_judge_model(run, data)                        # judge.kind reward_model / llm_as_judge only

        for t in range(1, config.run.iterations + 1):
            try:
                check_judge_health(run, t, data)                  # off-policy: the judge on held-out seed pairs
                generations = generate_responses(run, t, prompts=data.iteration_prompts[t - 1])
                pairs = judge_pairs(run, t, generations)          # pair rule, confidence filter, seed replay
                audit_labels(run, t, pairs)                       # on-policy: stop instead of training on noise
            except (JudgeHealthError, LabelAuditError) as exc:
                print(f"spa-ray: {exc}", file=sys.stderr)
                return 3
            pi_prev = train_policy(run, t=t, policy=pi_prev, pairs=pairs)  # init = ref = pi_{t-1}
            evaluate(run, policy=pi_prev, version=t + 1, name=f"pi_{t}")

        print_final_table(run)
    return 0
