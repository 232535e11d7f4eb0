"""Side by side with the authors' library (UT-Austin-RPL/amago, tag v2): one of our CPU demos and the same experiment
configured through their public API, flag by flag, then both libraries' evaluation curves in one figure.

    python tests/tools/side_by_side.py --demo popgym --dry-run             # both sides' commands and the settings table
    python tests/tools/side_by_side.py --demo popgym --seeds 2 --parallel 2 --side both
    python tests/tools/side_by_side.py --demo babyai --report-only         # redraw from the runs/ already there
    python tests/tools/side_by_side.py --demo popgym --smoke               # 1,024 steps a side: does the pipeline work?

Set-up (their repository at tag v2 in /work/amago_src, their own virtual environment in /work/amago_venv) and the
settings table with what cannot be matched: docs/parity.md. A developer tool: no script or test imports it.

ours:   our script with bench_learning's demo flags (ind/ind), --seed s --device cpu, TensorBoard in runs/<name>.
theirs: this same file run by their venv's python with --theirs-run runs/<name>/settings.json: it builds their
        amago.Experiment with a MultiTaskAgent (two-hot critics + CRR filter: Ind/Ind) through their API (gin bindings,
        their env classes, their example's BabyAI encoder); only the env list is narrowed to our tasks. Their v2
        logs only to wandb, so a subclass of their Experiment also writes each dict it logs to runs/<name>/metrics.jsonl.
Each run is a subprocess with OMP_NUM_THREADS=1. Rates: env steps/s = env steps / seconds spent collecting, updates/s
= updates / seconds spent in update phases, wall minutes = from the run's start to its final evaluation.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_learning as bl  # noqa: E402  (the demo flags and TensorBoard readers; it puts the repo root on sys.path)

ROOT = bl.ROOT
THEIR_PYTHON = os.environ.get("AMAGO_PYTHON", "/work/amago_venv/bin/python")
THEIR_SRC = os.environ.get("AMAGO_SRC", "/work/amago_src")
THEIR_TAG, THEIR_COMMIT = "v2", "f11fc9da916de9f4134d06bcdca6645b7dade912"
SMOKE_STEPS, SMOKE_EVAL_EVERY = 1024, 512  # two epochs of 8 envs x 64 steps, an evaluation after each

# Each demo: our script, bench_learning's benchmark and its Ind/Ind config (the paper's default update: two-hot critic,
# Eq. 3, and CRR-filtered actor, Eq. 4), the metric both sides are scored on (None: the benchmark's own), and the
# longest meta-rollout in their envs, which sizes their evaluation budget (they evaluate for a number of env steps, we
# for a number of meta-rollouts): POPGym's CartPoles run up to 200 steps an episode, twice, plus the one extra step
# their multi-domain env spends on each inner reset and at the end; BabyAI's 4 + 2 tasks allow up to 64 steps an
# attempt, twice, plus one extra step between the attempts; Procgen's meta-rollout is capped at --horizon steps.
# Procgen is scored on starpilot's total return over both attempts: their v2 logs no per-attempt Procgen return.
DEMOS = {
    "popgym": dict(script="amago2_popgym.py", bench="popgym", config="ind/ind", metric=None, longest_rollout=2 * 200 + 2),
    "babyai": dict(script="amago2_babyai.py", bench="babyai", config="ind/ind", metric=None, longest_rollout=2 * 64 + 1),
    "procgen": dict(
        script="amago2_procgen.py",
        bench="procgen-starpilot",
        config="ind/ind 120k",
        metric=("eval/starpilot/return", "starpilot return, both attempts (unseen levels)"),
        longest_rollout=None,
    ),
}


def metric(demo: str) -> tuple[str, str]:
    """The TensorBoard scalar both sides are scored on, and its label."""
    bench = bl.BENCHMARKS[DEMOS[demo]["bench"]]
    return DEMOS[demo]["metric"] or (bench["metric"], bench["label"])


# ==== Our side: the demo's flags and Args ============================================================================
def demo_flags(demo: str, smoke: bool) -> list[str]:
    flags = bl.BENCHMARKS[DEMOS[demo]["bench"]]["configs"][DEMOS[demo]["config"]]
    if smoke:
        flags = bl.with_flag(bl.with_flag(flags, "--total-timesteps", str(SMOKE_STEPS)), "--eval-every", str(SMOKE_EVAL_EVERY))
    return flags


def our_args(demo: str, flags: list[str]):
    """The demo's flags parsed by our script's own Args: every setting, defaults included."""
    import importlib

    import tyro

    module = importlib.import_module(DEMOS[demo]["script"][:-3])
    return module, tyro.cli(module.Args, args=flags)


def run_name(demo: str, side: str, seed: int, smoke: bool) -> str:
    return f"parity-{'smoke-' if smoke else ''}{demo}-{side}-s{seed}"


def our_command(demo: str, flags: list[str], seed: int, name: str) -> list[str]:
    return [sys.executable, DEMOS[demo]["script"], *flags, "--seed", str(seed), "--device", "cpu", "--run-name", name]


# ==== Their side: settings derived from our Args, and the launch =====================================================
def their_settings(demo: str, module, a, seed: int, name: str) -> dict:
    """Everything their launch needs, derived from our Args so that the two cannot drift apart (written as JSON)."""
    per_env = math.ceil(a.total_timesteps / a.num_envs)
    s = dict(demo=demo, seed=seed, run_name=name, out_dir=os.path.join(ROOT, "runs", name), their_src=THEIR_SRC)
    s.update(num_envs=a.num_envs, steps_per_epoch=a.steps_per_epoch, updates_per_epoch=a.updates_per_epoch)
    s.update(total_per_env=per_env, epochs=math.ceil(per_env / a.steps_per_epoch), eval_every=a.eval_every)
    s.update(batch_size=a.batch_size, context_len=a.context_len, buffer_trajectories=a.buffer_size)
    s.update(d_model=a.d_model, d_ff=a.d_ff, n_layers=a.n_layers, n_heads=a.n_heads, d_token=a.d_token, dropout=a.dropout)
    s.update(head_hidden=a.head_hidden, num_bins=a.num_bins, num_critics=a.num_critics, tau=a.tau, crr_samples=a.crr_samples)
    s.update(crr_threshold=a.crr_threshold, reward_multiplier=a.reward_multiplier, critic_weight=a.critic_weight)
    s.update(learning_rate=a.learning_rate, warmup=a.warmup_updates, weight_decay=a.weight_decay, grad_clip=a.grad_clip)
    s.update(rollout_gamma=a.rollout_gamma, aux_gammas=[g for g in a.gammas if g != a.rollout_gamma])
    s.update(eps_start=a.eps_start, eps_end=a.eps_end, eps_anneal_steps=a.eps_anneal_steps)
    if demo == "popgym":
        s.update(tasks=list(a.tasks), n_actions=int(module.POPGymMetaEnv(a.tasks).action_space.n))
        eval_tasks = len(a.tasks)
    elif demo == "procgen":
        # their env draws levels with random.randint (inclusive); ours trains on [0, n) and evaluates from EVAL_START_LEVEL
        s.update(games=list(a.games), distribution=a.mode, horizon=a.horizon, impala_channels=list(a.impala_channels))
        s.update(train_seeds=[0, a.num_train_levels - 1], eval_seeds=[module.EVAL_START_LEVEL, 2**31 - 2])
        eval_tasks = len(a.games)
    else:
        ids = [module.babyai_id(t) for t in a.tasks + a.test_tasks]
        s.update(train_ids=ids[: len(a.tasks)], test_ids=ids[len(a.tasks) :], k_episodes=a.k_episodes)
        # their env draws seeds with random.randint (inclusive), ours with an exclusive upper end
        s.update(train_seeds=[module.TRAIN_SEED_RANGE[0], module.TRAIN_SEED_RANGE[1] - 1])
        s.update(eval_seeds=[module.EVAL_SEED_RANGE[0], module.EVAL_SEED_RANGE[1] - 1])
        eval_tasks = len(a.tasks) + len(a.test_tasks)
    # at least as many finished meta-rollouts per task as our --eval-episodes, even if every one runs to its limit
    rollouts_per_env = math.ceil(a.eval_episodes * eval_tasks / a.num_envs)
    longest = DEMOS[demo]["longest_rollout"] or a.horizon + 1  # Procgen: their extra step between the attempts
    # their replay holds what an env has saved: a finished meta-rollout, or a chunk of traj_save_len steps. POPGym and
    # BabyAI: one file per finished rollout (they end within an epoch or two, as our replay samples them whole);
    # Procgen's rollouts run up to --horizon steps: chunks of 4 contexts, as their Procgen example saves them, so that
    # data reaches their learner while a rollout runs, as ours samples rollouts in progress
    s.update(traj_save_len=4 * a.context_len if demo == "procgen" else 10_000)
    s.update(val_steps_per_env=rollouts_per_env * longest, val_rollouts_per_env=rollouts_per_env)
    return s


def their_command(settings_path: str) -> list[str]:
    return [THEIR_PYTHON, os.path.abspath(__file__), "--theirs-run", settings_path]


# ==== The settings table ==============================================================================================
def row(name: str, ours, theirs, status: str = "yes") -> tuple:
    return (name, str(ours), str(theirs), status)


def settings_table(demo: str, a, s: dict) -> list[tuple]:
    """(setting, ours, theirs, matched?) for every setting of the demo; 'no' and 'in effect' rows say why."""
    rows = task_rows(demo, a, s)
    n_epochs = s["epochs"]
    rows += [
        row("env count", a.num_envs, f"parallel_actors={s['num_envs']}"),
        row("env steps per epoch, per env", a.steps_per_epoch, f"train_timesteps_per_epoch={s['steps_per_epoch']}"),
        row("updates per epoch", a.updates_per_epoch, f"train_batches_per_epoch={s['updates_per_epoch']}"),
        row(
            "env steps in all",
            f"{a.total_timesteps:,}",
            f"{s['total_per_env'] * s['num_envs']:,} ({n_epochs} epochs, the last cut short)",
        ),
        row("batch (sequences)", a.batch_size, s["batch_size"]),
        row("context length", a.context_len, f"max_seq_len={s['context_len']}"),
        row(
            "layers / d_model / heads / d_ff",
            f"{a.n_layers} / {a.d_model} / {a.n_heads} / {a.d_ff}",
            f"{s['n_layers']} / {s['d_model']} / {s['n_heads']} / {s['d_ff']}",
        ),
        row("dropout (embedding, feed-forward)", a.dropout, f"dropout_emb = dropout_ff = {s['dropout']}"),
        row("positions", "sinusoidal, absolute", "pos_emb='fixed' (sinusoidal, absolute)"),
        row(
            "attention in rollouts",
            "KV cache; past l a sliding window of cached keys",
            "VanillaAttention, the last l timesteps recomputed each step",
            "no: their KV cache needs flash-attn (GPU only); rollouts past l steps see fresh keys there, stale ones here",
        ),
        row("token (timestep encoder output)", a.d_token, s["d_token"]),
        row("actor / critic heads", f"2 x {a.head_hidden}", f"Actor, NCriticsTwoHot: n_layers=2, d_hidden={s['head_hidden']}"),
        row(
            "learning rate / warmup updates",
            f"{a.learning_rate:g} / {a.warmup_updates}",
            f"{s['learning_rate']:g} / {s['warmup']}",
        ),
        row(
            "AdamW weight decay / grad clip",
            f"{a.weight_decay:g} / {a.grad_clip:g}",
            f"l2_coeff={s['weight_decay']:g} / {s['grad_clip']:g}",
        ),
        row("critic loss weight", a.critic_weight, f"critic_loss_weight={s['critic_weight']:g}"),
        row(
            "gammas (acting one)",
            f"{a.gammas} ({a.rollout_gamma})",
            f"Multigammas {s['aux_gammas']} + gamma ({s['rollout_gamma']})",
        ),
        row("critic's gamma input", "symlog(1 / (1 - gamma))", "gamma's index / G", "no: a difference in their critic"),
        row("critics / in the TD target", f"{a.num_critics} / 2 random, mean", f"{s['num_critics']} / num_critics_td=2, mean"),
        row("two-hot bins / range", f"{a.num_bins} / +-1e5", f"output_bins={s['num_bins']} / min,max_return=None (+-1e5)"),
        row("reward multiplier (loss only)", a.reward_multiplier, s["reward_multiplier"]),
        row("tau (EMA heads)", a.tau, s["tau"]),
        row(
            "CRR policy samples / threshold",
            f"{a.crr_samples} / {a.crr_threshold:g}",
            f"fbc_filter_k={s['crr_samples']} / binary_filter.threshold={s['crr_threshold']:g}",
        ),
        row(
            "epsilon start -> end, anneal steps per env",
            f"{a.eps_start:g} -> {a.eps_end:g}, {a.eps_anneal_steps:,}",
            f"EpsilonGreedy {s['eps_start']:g} -> {s['eps_end']:g}, steps_anneal={s['eps_anneal_steps']:,}",
        ),
        row("epsilon per meta-rollout", "x U[0, 1)", "x U[0, 1) (global_multiplier)"),
        row(
            "replay capacity",
            f"{a.buffer_size:,} timesteps",
            f"dset_max_size={s['buffer_trajectories']:,} trajectories",
            "in effect: neither fills within the run (capacity >= the run's env steps)",
        ),
        row(
            "replay sampling",
            "a timestep uniformly, window moved back to fit; rollouts in progress too",
            "a finished rollout's file uniformly, then a window in it",
            "no: their design (docs/differences.md); their learner waits for the first finished rollout",
        ),
    ]
    return (
        rows
        + eval_rows(demo, a, s)
        + [
            row("precision / threads / vector env", "fp32 / 1 / sync", "fp32 / 1 / DummyAsyncVectorEnv (no_async)"),
            row(
                "batch loading",
                "one prefetch thread",
                "dloader_workers=0 (in the main thread)",
                "in effect: both stay on the run's core",
            ),
        ]
    )


def task_rows(demo: str, a, s: dict) -> list[tuple]:
    if demo == "popgym":
        return [
            row("tasks", ", ".join(a.tasks), "MultiDomainPOPGym, mt_names = " + ", ".join(s["tasks"])),
            row(
                "protocol",
                "one-shot: exploration episode (reward an input, learnt as 0), then the scored one",
                "warmup_episodes=1: the same",
            ),
            row(
                "inner reset / end",
                "next episode's first observation follows directly",
                "one extra step (action ignored) at each",
                "no: their env's design (docs/differences.md)",
            ),
            row(
                "actions",
                f"Discrete({s['n_actions']}), largest of the tasks'",
                f"Discrete({s['n_actions']}) (their default 26)",
                "yes (set on a subclass of their env: the 26 would make 22 of 26 actions invalid)",
            ),
            row(
                "observation",
                "26 padded + valid-action flag",
                "26 padded + episode counter + valid-action flag + reward",
                "no: their env's layout (the reward is in their observation as well)",
            ),
            row(
                "timestep input besides obs",
                "prev action, prev reward, reset",
                "prev action, prev reward, reset, t / 10,000",
                "no: their rl2 input carries time",
            ),
            row(
                "timestep encoder",
                "InputNorm, MLP(512, 512), LayerNorm",
                "FFTstepEncoder(n_layers=2, d_hidden=512), LayerNorm",
            ),
        ]
    if demo == "procgen":
        return [
            row("games", ", ".join(a.games), f"TwoShotMTProcgen, games = {', '.join(s['games'])}"),
            row("mode", f"{a.mode} levels", f"distribution_mode={s['distribution']!r}"),
            row("protocol", "two attempts on one level", "TwoShotMTProcgen: the same"),
            row(
                "levels train / eval",
                f"[0, {a.num_train_levels}) / [{s['eval_seeds'][0]}, ...)",
                f"{s['train_seeds']} / {s['eval_seeds']} inclusive",
            ),
            row("meta-rollout cap", f"--horizon {a.horizon}", f"ProcgenAMAGO(horizon={s['horizon']})"),
            row(
                "replay files",
                "rollouts in progress sampled too",
                f"traj_save_len={s['traj_save_len']} (4 x max_seq_len, as their example): chunks of a running rollout",
                "in effect: data reaches both learners while a rollout runs",
            ),
            row(
                "attempt boundary",
                "the level restored (set_state), its first frame follows directly",
                "one extra step (action ignored): the level rebuilt from its seed",
                "no: their env's design",
            ),
            row("attempt-2 marker", "4x4 black box at the top left", "the same box", "yes"),
            row(
                "timestep input besides the frame",
                "prev action, prev reward, reset",
                "prev action, prev reward, reset, t / horizon",
                "no: their rl2 input carries time",
            ),
            row(
                "timestep encoder",
                f"IMPALA CNN {'-'.join(map(str, a.impala_channels))} -> 256, LayerNorm; symlog rl2 -> 12; merge, LayerNorm",
                f"CNNTstepEncoder: IMPALAishCNN {'-'.join(map(str, s['impala_channels']))} -> 256; rl2 InputNorm -> 12",
                "no: ours has a LayerNorm on the image features and a LeakyReLU before the merge; theirs an InputNorm on rl2",
            ),
            row(
                "augmentation",
                f"random shift +-4 px on {a.augment_fraction:.0%} of frames",
                "DrQv2Aug(4) on 75% of the batch's sequences",
                "in effect",
            ),
            row(
                "procgen", "procgen2 0.10.7 (gym3 API)", "procgen2 0.10.7 through gym 0.26's procgen:procgen-<game>-v0", "yes"
            ),
        ]
    return [
        row("training tasks", ", ".join(a.tasks), ", ".join(s["train_ids"])),
        row("held-out tasks", ", ".join(a.test_tasks), ", ".join(s["test_ids"])),
        row("protocol", f"k = {a.k_episodes} attempts on one layout", f"MultitaskMetaBabyAI(k_episodes={s['k_episodes']})"),
        row("layout seeds train / eval", "[0, 5000) / [5000, 1e6)", f"{s['train_seeds']} / {s['eval_seeds']} inclusive"),
        row(
            "attempt boundary",
            "next attempt's first observation follows directly",
            "one extra step (action ignored)",
            "no: their env's design",
        ),
        row(
            "observation extras",
            "direction, step / max_steps, attempt / k",
            "direction, attempt / k; t / 1000 in rl2",
            "no: their env's layout",
        ),
        row(
            "timestep encoder",
            "cell-embedding CNN 32-64-64 -> 128, word RNN 32 -> 128, extras MLP 64",
            "their example's BabyTstepEncoder: GridworldCNN 16-32-48, TokenGoalEmb RNN 96 -> 48, extras MLP 32 -> 16",
            "no: different encoders (only the token size is matched)",
        ),
        row("minigrid", "3.2.0 (gymnasium 1.x)", "2.5.0 (gymnasium 0.29.1)", "in effect: the same levels and time limits"),
    ]


def eval_rows(demo: str, a, s: dict) -> list[tuple]:
    if demo == "popgym":
        ours = f"one env per task, {a.eval_episodes} meta-rollouts each"
        theirs = f"{s['num_envs']} envs, {s['num_envs'] // len(s['tasks'])} per task, {s['val_steps_per_env']:,} steps each"
        status = f"in effect: >= {s['val_rollouts_per_env'] * (s['num_envs'] // len(s['tasks']))} finished rollouts per task"
    elif demo == "procgen":
        ours = f"one env per game, {a.eval_episodes} meta-rollouts each"
        theirs = f"{s['num_envs']} envs, {s['val_steps_per_env']:,} steps each"
        status = f"in effect: >= {s['val_rollouts_per_env'] * s['num_envs']} finished rollouts"
    else:
        ours = f"one env per task (4 + 2), {a.eval_episodes} meta-rollouts each"
        theirs = f"{s['num_envs']} envs drawing from the 6 tasks, {s['val_steps_per_env']:,} steps each"
        status = f"in effect: >= {s['val_rollouts_per_env'] * s['num_envs']} finished rollouts, tasks drawn at random"
    return [
        row("evaluation episodes", ours, theirs, status),
        row(
            "evaluation schedule",
            f"after the update phase that crosses each {a.eval_every:,} steps, and at the end",
            "the same: their evaluate_val gated to the same crossings, and once after learn()",
        ),
        row("evaluation actions", "sampled, no epsilon", "sample_actions=True, no exploration wrapper"),
    ]


def print_table(rows: list[tuple]):
    print("| setting | ours | theirs | matched? |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


# ==== Runs =============================================================================================================
def plan(
    demo: str, sides: list[str], seeds: int, smoke: bool, only: list[int] | None = None
) -> tuple[list[dict], list[tuple]]:
    """Every run to launch, seed-major so that runs sharing the cores at once are one of each side, and the table."""
    flags = demo_flags(demo, smoke)
    module, a = our_args(demo, flags)
    jobs, table = [], None
    for seed in only or range(1, seeds + 1):
        for side in sides:
            name = run_name(demo, side, seed, smoke)
            if side == "ours":
                jobs.append(dict(name=name, cmd=our_command(demo, flags, seed, name)))
                continue
            s = their_settings(demo, module, a, seed, name)
            path = os.path.join(s["out_dir"], "settings.json")
            jobs.append(dict(name=name, cmd=their_command(path), settings=s, settings_path=path))
            table = table or settings_table(demo, a, s)
    if table is None:  # --side ours: still show what the other side would run
        table = settings_table(demo, a, their_settings(demo, module, a, 1, run_name(demo, "theirs", 1, smoke)))
    return jobs, table


def launch(job: dict) -> subprocess.Popen:
    run_dir = os.path.join(ROOT, "runs", job["name"])
    if "settings" in job:
        os.makedirs(run_dir)
        with open(job["settings_path"], "w") as f:
            json.dump(job["settings"], f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    log = open(os.path.join(ROOT, "runs", f"{job['name']}.log"), "w")
    print(
        "$ OMP_NUM_THREADS=1 " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in job["cmd"]),
        flush=True,
    )
    return subprocess.Popen(job["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_all(jobs: list[dict], parallel: int):
    taken = [j["name"] for j in jobs if os.path.exists(os.path.join(ROOT, "runs", j["name"]))]
    if taken:
        sys.exit(f"runs/ already holds {taken}: remove them, or use --report-only to read them")
    procs = {}
    for job in jobs:
        while sum(p.poll() is None for p in procs.values()) >= parallel:
            time.sleep(5)
        procs[job["name"]] = launch(job)
    failed = [name for name, p in procs.items() if p.wait() != 0]
    if failed:
        sys.exit(f"runs failed (see runs/<name>.log): {failed}")


# ==== Reading both sides' curves and rates =============================================================================
def read_ours(demo: str, name: str, a) -> dict:
    """Curve of the demo's metric, and the time split. Each epoch logs charts/SPS after collecting (steps / (collect +
    update seconds so far), so without that epoch's updates) and charts/updates_per_second after its update phase."""
    steps, values, minutes = bl.read_curve(name, metric(demo)[0])
    acc = bl.scalars(name)
    ups = np.array([e.value for e in acc.Scalars("charts/updates_per_second")])
    sps = acc.Scalars("charts/SPS")[-1]
    update_s = float(np.sum(a.updates_per_epoch / ups))
    collect_s = sps.step / sps.value - float(np.sum(a.updates_per_epoch / ups[:-1]))  # the last update phase came after
    return dict(
        steps=steps,
        values=values,
        minutes=minutes,
        env_steps=int(sps.step),
        collect_s=collect_s,
        update_s=update_s,
        updates=a.updates_per_epoch * len(ups),
        evals=len(steps),
    )


def read_theirs(demo: str, name: str, a) -> dict:
    """Their logged dicts (metrics.jsonl): evaluation rows ("val") scored as ours, clocks from the last row."""
    with open(os.path.join(ROOT, "runs", name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if r["key"] == "val"]
    last = rows[-1]
    score = {"popgym": popgym_score, "babyai": babyai_score, "procgen": procgen_score}[demo]
    update_s = last["wall_s"] - last["collect_s"] - last["eval_s"] - last["startup_s"]
    return dict(
        steps=np.array([r["frames"] for r in evals]),
        values=np.array([score(r, a) for r in evals]),
        minutes=last["wall_s"] / 60,
        env_steps=last["frames"],
        collect_s=last["collect_s"],
        update_s=update_s,
        updates=last["updates"],
        evals=len(evals),
    )


def popgym_score(r: dict, a) -> float:
    """Our eval/normalised_score from their per-task returns: (return - random) / (1 - random), mean over tasks."""
    from amago2_popgym import summarize_eval

    prefix = "Average Total Return in MultiDomainPOPGym-"
    per_task = {k[len(prefix) :]: {"return": v} for k, v in r.items() if k.startswith(prefix)}
    return summarize_eval(per_task)["normalised_score"] if per_task else float("nan")


def babyai_score(r: dict, a) -> float:
    """Our eval/train_success_2_mean: attempt-2 success, mean over the training tasks (their names end in -v0 / -v1)."""
    prefix = "Average Episode 2 Success in "
    per_task = {k[len(prefix) :].rsplit("-", 1)[0]: v for k, v in r.items() if k.startswith(prefix)}
    found = [per_task[t] for t in a.tasks if t in per_task]
    return float(np.mean(found)) if found else float("nan")


def procgen_score(r: dict, a) -> float:
    """Our eval/<game>/return (both attempts, default reward scale) from their "Average Total Return in <game>"."""
    return float(np.mean([r.get(f"Average Total Return in {g}", float("nan")) for g in a.games]))


def report(demo: str, seeds: int, smoke: bool):
    flags = demo_flags(demo, smoke)
    _, a = our_args(demo, flags)
    readers = {"ours": read_ours, "theirs": read_theirs}
    results = {}
    for side, reader in readers.items():
        for seed in range(1, seeds + 1):
            name = run_name(demo, side, seed, smoke)
            if os.path.isdir(os.path.join(ROOT, "runs", name)):
                results[(side, seed)] = reader(demo, name, a)
    if not results:
        sys.exit(f"no runs/parity-{'smoke-' if smoke else ''}{demo}-* to report")
    reference = bl.random_reference(DEMOS[demo]["script"], flags)
    random_level = reference[metric(demo)[0].removeprefix("eval/")]
    print_results(demo, results, random_level, smoke)
    figure = os.path.join(
        ROOT, "runs" if smoke else os.path.join("docs", "figures"), f"parity-{'smoke-' if smoke else ''}{demo}.png"
    )
    plot(demo, results, random_level, figure)


def projected_minutes(res: dict, demo: str) -> float:
    """Minutes for the full demo budget at this run's measured rates, with its evaluations' mean cost."""
    _, full = our_args(demo, demo_flags(demo, smoke=False))
    epochs = math.ceil(full.total_timesteps / (full.num_envs * full.steps_per_epoch))
    n_evals = math.ceil(full.total_timesteps / full.eval_every)
    eval_s = max(res["minutes"] * 60 - res["collect_s"] - res["update_s"], 0.0) / max(res["evals"], 1)
    rate_s = (
        full.total_timesteps * res["collect_s"] / res["env_steps"]
        + epochs * full.updates_per_epoch * res["update_s"] / res["updates"]
    )
    return (rate_s + n_evals * eval_s) / 60


def print_results(demo: str, results: dict, random_level: float, smoke: bool):
    label = metric(demo)[1]
    print(f"\n{demo}: {label}; random policy {random_level:.3f}\n")
    extra = " projected full-run minutes |" if smoke else ""
    print("| side | seed | env steps | final eval | wall minutes | env steps/s | updates/s | updates |" + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|" if smoke else ""))
    for (side, seed), r in sorted(results.items()):
        line = (
            f"| {side} | {seed} | {r['env_steps']:,} | {r['values'][-1]:.3f} | {r['minutes']:.1f} | "
            f"{r['env_steps'] / r['collect_s']:.0f} | {r['updates'] / max(r['update_s'], 1e-9):.2f} | {r['updates']:,} |"
        )
        print(line + (f" {projected_minutes(r, demo):.0f} |" if smoke else ""))


def plot(demo: str, results: dict, random_level: float, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"ours": "tab:blue", "theirs": "tab:orange"}
    names = {"ours": "ours (amago2-clean)", "theirs": f"official AMAGO {THEIR_TAG}"}
    for (side, seed), r in sorted(results.items()):
        style = ["-", "--", "-."][(seed - 1) % 3]  # seeds 1, 2, 3 apart
        ax.plot(
            r["steps"],
            r["values"],
            color=colors[side],
            linestyle=style,
            marker="o",
            markersize=3,
            label=f"{names[side]}, seed {seed}",
        )
    ax.axhline(random_level, color="grey", linestyle=":", label="random policy")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(textwrap.fill(metric(demo)[1], 45), fontsize=9)
    ax.set_title(f"{demo} CPU demo, Ind/Ind: ours and the authors' library")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"figure: {os.path.relpath(path, ROOT)}")


# ==== Run by THEIR venv's python (--theirs-run): their Experiment, through their API ===================================
def theirs_run(settings_path: str):
    with open(settings_path) as f:
        s = json.load(f)
    import random

    import torch

    random.seed(s["seed"])  # their envs and exploration draw from python's and numpy's global generators
    np.random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    import amago
    from amago.cli_utils import use_config

    config = their_gin_bindings(s)
    envs = {"popgym": their_popgym_envs, "babyai": their_babyai_envs, "procgen": their_procgen_envs}
    make_train, make_val = envs[s["demo"]](s, config)
    use_config(config)
    experiment = logged_experiment_class()(**their_experiment_kwargs(s, amago, make_train, make_val))
    experiment.parity = s
    experiment.start()
    experiment.learn()
    experiment.evaluate_val(force=True)  # the final evaluation, as our scripts do at the end
    experiment.delete_buffer_from_disk()  # the replay files (as their examples do); config.txt stays
    experiment.close_log()


def their_gin_bindings(s: dict) -> dict:
    """Their gin parameters for the agent, the networks and exploration, from our settings."""
    from amago.cli_utils import switch_traj_encoder, turn_off_goal_conditioning

    net, tformer = "amago.nets.actor_critic", "amago.nets.traj_encoders.TformerTrajEncoder"
    config = {
        "amago.agent.Agent.num_critics": s["num_critics"],
        "amago.agent.Agent.num_critics_td": 2,
        "amago.agent.Agent.gamma": s["rollout_gamma"],  # the acting gamma, always their last head
        "amago.agent.Agent.use_multigamma": True,
        "amago.agent.Multigammas.discrete": s["aux_gammas"],
        "amago.agent.Agent.tau": s["tau"],
        "amago.agent.Agent.reward_multiplier": s["reward_multiplier"],
        "amago.agent.MultiTaskAgent.fbc_filter_k": s["crr_samples"],
        "amago.agent.binary_filter.threshold": s["crr_threshold"],
        f"{net}.NCriticsTwoHot.output_bins": s["num_bins"],
        f"{net}.NCriticsTwoHot.min_return": None,  # their default limits, +-1e5, as ours
        f"{net}.NCriticsTwoHot.max_return": None,
        f"{net}.NCriticsTwoHot.d_hidden": s["head_hidden"],
        f"{net}.NCriticsTwoHot.n_layers": 2,
        f"{net}.Actor.d_hidden": s["head_hidden"],
        f"{net}.Actor.n_layers": 2,
        "amago.envs.env_utils.EpsilonGreedy.eps_start": s["eps_start"],
        "amago.envs.env_utils.EpsilonGreedy.eps_end": s["eps_end"],
        "amago.envs.env_utils.EpsilonGreedy.steps_anneal": s["eps_anneal_steps"],
    }
    switch_traj_encoder(config, arch="transformer", memory_size=s["d_model"], layers=s["n_layers"])
    config.update(
        {
            f"{tformer}.d_ff": s["d_ff"],  # switch_traj_encoder sets 4 * d_model
            f"{tformer}.n_heads": s["n_heads"],
            f"{tformer}.dropout_ff": s["dropout"],
            f"{tformer}.dropout_emb": s["dropout"],
            f"{tformer}.pos_emb": "fixed",  # sinusoidal, as ours (their BabyAI example's choice too)
            f"{tformer}.attention": "vanilla",  # flash-attn is GPU-only
        }
    )
    return turn_off_goal_conditioning(config)


def their_popgym_envs(s: dict, config: dict):
    """Their multi-domain one-shot POPGym env, its task list narrowed to ours and its action space to theirs' largest."""
    import gymnasium as gym
    from amago.cli_utils import switch_tstep_encoder
    from amago.envs.builtin.gym_envs import GymEnv
    from amago.envs.builtin.popgym_envs import MultiDomainPOPGym

    class Tasks(MultiDomainPOPGym):
        def __init__(self, tasks: list[str]):
            self.mt_names = list(tasks)  # read by their __init__ and reset (a class attribute there)
            super().__init__(warmup_episodes=1)
            self.action_space = gym.spaces.Discrete(s["n_actions"])  # their 26 fits all 27 tasks

    class Env(GymEnv):  # as their MultiDomainPOPGymAMAGO, which builds the 27-task env itself
        def __init__(self, tasks: list[str]):
            super().__init__(Tasks(tasks), env_name="MultiDomainPOPGym", horizon=10_000, start=0, zero_shot=True)

        @property
        def env_name(self):
            return f"MultiDomainPOPGym-{self.env.unwrapped.current_env_name}"

    switch_tstep_encoder(config, arch="ff", n_layers=2, d_hidden=512, d_output=s["d_token"])
    tasks = s["tasks"]
    # evaluation envs pinned to the tasks in turn (ours: one env per task), so each task gets the same share
    make_val = [lambda t=tasks[i % len(tasks)]: Env([t]) for i in range(s["num_envs"])]
    return (lambda: Env(tasks)), make_val


def their_babyai_envs(s: dict, config: dict):
    """Their MultitaskMetaBabyAI env and their BabyAI example's env wrapper and timestep encoder (imported, not copied)."""
    import functools
    import importlib.util

    from amago.envs.builtin.babyai import MultitaskMetaBabyAI

    spec = importlib.util.spec_from_file_location(
        "amago_example_babyai", os.path.join(s["their_src"], "examples", "11_babyai.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # its launch sits under `if __name__ == "__main__"`
    config["amago.agent.Agent.tstep_encoder_Cls"] = functools.partial(
        example.BabyTstepEncoder, obs_kind="partial-grid", emb_dim=s["d_token"]
    )

    def make(ids: list[str], seeds: list[int]):
        env = MultitaskMetaBabyAI(ids, k_episodes=s["k_episodes"], seed_range=tuple(seeds), observation_type="partial-grid")
        return example.BabyAIAMAGOEnv(env)

    return (lambda: make(s["train_ids"], s["train_seeds"])), (lambda: make(s["train_ids"] + s["test_ids"], s["eval_seeds"]))


def their_procgen_envs(s: dict, config: dict):
    """Their two-attempt multi-game Procgen env (procgen2 in their venv: the same procgen through gym 0.26) and their
    CNN timestep encoder with the IMPALA CNN at our block depths, as their multi-task Procgen example builds them."""
    from amago.cli_utils import switch_tstep_encoder
    from amago.envs.builtin.procgen_envs import ProcgenAMAGO, TwoShotMTProcgen
    from amago.nets.cnn import IMPALAishCNN

    switch_tstep_encoder(
        config, arch="cnn", cnn_Cls=IMPALAishCNN, channels_first=False, img_features=256, d_output=s["d_token"]
    )
    config["amago.nets.cnn.IMPALAishCNN.cnn_block_depths"] = s["impala_channels"]

    def make(seeds: list[int]):
        env = TwoShotMTProcgen(s["games"], s["distribution"], seed_range=tuple(seeds))
        return ProcgenAMAGO(env, horizon=s["horizon"])

    return (lambda: make(s["train_seeds"])), (lambda: make(s["eval_seeds"]))


def their_experiment_kwargs(s: dict, amago, make_train, make_val) -> dict:
    from amago.envs.env_utils import EpsilonGreedy

    return dict(
        run_name=s["run_name"],
        agent_type=amago.agent.MultiTaskAgent,  # two-hot critics + CRR filter (online_coeff 0, offline_coeff 1)
        make_train_env=make_train,
        make_val_env=make_val,
        max_seq_len=s["context_len"],
        traj_save_len=s["traj_save_len"],
        stagger_traj_file_lengths=False,
        parallel_actors=s["num_envs"],
        async_envs=False,  # one core per run
        exploration_wrapper_Cls=EpsilonGreedy,
        sample_actions=True,
        log_to_wandb=False,  # the logged dicts go to metrics.jsonl (LoggedExperiment.log)
        verbose=False,
        dset_root=os.path.join(s["out_dir"], "amago"),
        dset_name=s["run_name"],
        dset_max_size=s["buffer_trajectories"],
        save_trajs_as="npz",
        epochs=s["epochs"],
        train_timesteps_per_epoch=s["steps_per_epoch"],
        train_batches_per_epoch=s["updates_per_epoch"],
        val_interval=1,  # asked every epoch; LoggedExperiment.evaluate_val keeps our schedule
        val_timesteps_per_epoch=s["val_steps_per_env"],
        ckpt_interval=None,
        always_save_latest=False,
        batch_size=s["batch_size"],
        dloader_workers=0,
        learning_rate=s["learning_rate"],
        critic_loss_weight=s["critic_weight"],
        lr_warmup_steps=s["warmup"],
        grad_clip=s["grad_clip"],
        l2_coeff=s["weight_decay"],
        fast_inference=False,  # their KV cache needs flash-attn
        mixed_precision="no",
    )


def logged_experiment_class():
    """Their Experiment, its learning untouched: each logged dict is also written locally with the env steps and the
    clocks, evaluations follow our schedule, and the last epoch collects only the steps left (as ours stops)."""
    import torch
    from amago import Experiment
    from amago import utils as amago_utils

    class LoggedExperiment(Experiment):
        def start(self):
            self.t0, self.clock, self.updates, self.gate_frames = time.time(), dict(collect=0.0, eval=0.0), 0, 0
            self.jsonl = open(os.path.join(self.parity["out_dir"], "metrics.jsonl"), "w")
            super().start()
            self.clock["startup"] = time.time() - self.t0
            # their count includes the target actor and the target and "maximized" critic copies; ours leaves them out
            trained = sum(p.numel() for p in self.policy.trainable_params)
            print(f"{type(self.policy).__name__}: {amago_utils.count_params(self.policy):,} parameters, {trained:,} trained")

        def frames(self) -> int:
            return int(sum(amago_utils.call_async_env(self.train_envs, "total_frames")))

        def collect_new_training_data(self):
            left = self.parity["total_per_env"] - self.frames() // self.parallel_actors
            self.train_timesteps_per_epoch = max(0, min(self.parity["steps_per_epoch"], left))
            start = time.time()
            super().collect_new_training_data()
            self.clock["collect"] += time.time() - start

        def train_step(self, batch, log_step: bool):
            self.updates += 1
            return super().train_step(batch, log_step)

        def evaluate_val(self, force: bool = False):
            # at epoch e's start (e epochs collected and learnt from) if e's steps crossed a multiple of eval_every:
            # the same points as our evaluation after the update phase that crosses it
            frames, every = self.frames(), self.parity["eval_every"]
            before, self.gate_frames = self.gate_frames, frames
            if not force and not (every > 0 and frames // every > before // every):
                return
            start = time.time()
            super().evaluate_val()
            self.clock["eval"] += time.time() - start

        def log(self, metrics_dict, key):
            super().log(metrics_dict, key)
            self.write_row(key, metrics_dict)

        def write_row(self, key: str, metrics_dict: dict):
            out = dict(key=key, frames=self.frames(), updates=self.updates, wall_s=time.time() - self.t0)
            out.update({f"{k}_s": v for k, v in self.clock.items()})
            out.setdefault("startup_s", out["wall_s"])
            for k, v in metrics_dict.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:
                    v = v.item()
                if isinstance(v, (int, float, bool, np.integer, np.floating, np.bool_)):
                    out[k] = float(v)
            self.jsonl.write(json.dumps(out) + "\n")
            self.jsonl.flush()
            if key == "val":
                print(
                    f"eval at {out['frames']:,} steps: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if "Average" in k)
                )

        def close_log(self):
            self.write_row("end", {})  # the clocks after the final evaluation (its own row was written inside it)
            self.jsonl.close()

    return LoggedExperiment


# ==== CLI =============================================================================================================
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", choices=sorted(DEMOS), help="the CPU demo (bench_learning's ind/ind config)")
    parser.add_argument(
        "--side", choices=["ours", "theirs", "both"], default="both", help="which library to run (default both)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds 1..N per side (default 2)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once, one torch thread each (default 1)")
    parser.add_argument(
        "--only-seed", type=int, action="append", help="run only this seed of 1..N (repeatable); the report covers all"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print both sides' commands and the settings table; run nothing"
    )
    parser.add_argument("--report-only", action="store_true", help="read the runs/ already there: table and figure")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_STEPS:,} env steps, evaluations every {SMOKE_EVAL_EVERY}: runs/parity-smoke-*, figure in runs/, "
        "and each run's projected minutes for the full demo",
    )
    parser.add_argument("--theirs-run", metavar="SETTINGS_JSON", help=argparse.SUPPRESS)  # run by their venv's python
    opts = parser.parse_args()
    if opts.theirs_run:
        return theirs_run(opts.theirs_run)
    if not opts.demo:
        parser.error("--demo is required")
    if any(not 1 <= seed <= opts.seeds for seed in opts.only_seed or []):
        parser.error(f"--only-seed must be one of the seeds 1..--seeds ({opts.seeds}), which the report covers")
    sides = ["ours", "theirs"] if opts.side == "both" else [opts.side]
    if not opts.report_only:
        jobs, table = plan(opts.demo, sides, opts.seeds, opts.smoke, opts.only_seed)
        demo = DEMOS[opts.demo]
        print(
            f"settings: ours ({demo['script']}, bench_learning {demo['bench']} {demo['config']}) against theirs "
            f"(UT-Austin-RPL/amago {THEIR_TAG}, {THEIR_COMMIT[:7]})\n"
        )
        print_table(table)
        print()
        if opts.dry_run:
            for job in jobs:
                print(
                    "$ OMP_NUM_THREADS=1 "
                    + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in job["cmd"])
                )
            return
        if "theirs" in sides and not os.path.exists(THEIR_PYTHON):
            sys.exit(f"their venv's python {THEIR_PYTHON} is missing: see docs/parity.md (or set AMAGO_PYTHON)")
        os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
        run_all(jobs, opts.parallel)
    report(opts.demo, opts.seeds, opts.smoke)


if __name__ == "__main__":
    main()
