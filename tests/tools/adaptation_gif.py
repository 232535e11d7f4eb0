"""A picture of in-context adaptation: one evaluation meta-rollout of a saved agent, its attempts side by side, as a GIF.

python tests/tools/adaptation_gif.py runs/<run_name> --caption "..." --out docs/figures/babyai-adaptation.gif

The run folder's checkpoint (--save-model) gives the script, its flags and the agent. The meta-rollout is drawn by
--seed on the first evaluation task (BabyAI: the first training task on unseen layouts; Meta-World: the first
training task), played as the periodic evaluation plays it (actions sampled from the acting head, no epsilon), and
never chosen by hand: a different seed is a different meta-rollout, whatever it shows. Each attempt is drawn in its
own panel; a panel that has finished holds its last frame. Supports amago2_babyai.py and amago2_metaworld.py runs.
"""

import argparse
import importlib
import os
import sys
import textwrap

import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def first_eval_env(module, args):
    """The first evaluation task's env, built to render frames (its make_env renders only under --capture-video)."""
    if module.__name__ == "amago2_babyai":
        task = args.tasks[0]
        return module.BabyAIMetaEnv(False, task, args.k_episodes, args.seed, args.tasks, render_mode="rgb_array"), task
    if module.__name__ == "amago2_metaworld":
        task = list(module.metaworld_benchmark(args.benchmark, args.ml1_task).train_classes)[0]
        env = module.MetaWorldMetaEnv(
            args.benchmark, args.ml1_task, True, args.k_episodes, args.episode_length, task, render_mode="rgb_array"
        )
        return env, task
    sys.exit(f"error: {module.__name__}.py: only BabyAI and Meta-World runs have attempts worth drawing side by side")


def play(run_dir: str, seed: int):
    """Frames of each attempt of one meta-rollout and its metrics (success_i, return_i)."""
    state = torch.load(os.path.join(run_dir, "checkpoint", "state.pt"), map_location="cpu", weights_only=False)
    module = importlib.import_module(state["script"].removesuffix(".py"))
    args = module.Args(**state["args"])
    env, task = first_eval_env(module, args)
    envs = module.make_vector_env([lambda: env], False)
    space = envs.single_action_space
    action_dim = int(space.n) if hasattr(space, "n") else int(space.shape[0])
    agent = module.Agent(envs.single_observation_space, action_dim, args)
    agent.load_state_dict(state["agent"])
    agent.eval()
    rollouts = module.MetaRollouts(envs, agent, args, torch.device("cpu"))
    torch.manual_seed(seed)
    rollouts.restart(seed)
    attempts = [[env.render()]]
    while True:
        finished, done = rollouts.step(rollouts.act(agent))
        if done[0]:  # the env has already started the next meta-rollout: its frame is not this one's
            envs.close()
            return attempts, finished[0][2], task, state["counters"]["global_step"]
        if rollouts.now["reset"][0]:  # an inner episode (a new attempt) starts at this frame
            attempts.append([])
        attempts[-1].append(env.render())


def compose(attempts: list, metrics: dict, caption: str, scale: float) -> list:
    """One image per time step: the attempts' panels side by side, each labelled, and the caption below."""
    h, w = attempts[0][0].shape[:2]
    pw, ph = int(w * scale), int(h * scale)
    width = pw * len(attempts)
    lines = [wrapped for line in caption.split("\\n") for wrapped in textwrap.wrap(line, width // 6) or [""]]
    band = 14 * len(lines) + 6  # PIL's default font: ~6 px per character, 14 px per line
    frames = []
    for i in range(max(len(a) for a in attempts)):
        canvas = Image.new("RGB", (pw * len(attempts), ph + 16 + band), "white")
        draw = ImageDraw.Draw(canvas)
        for k, frames_k in enumerate(attempts):
            frame = Image.fromarray(frames_k[min(i, len(frames_k) - 1)]).resize((pw, ph))
            canvas.paste(frame, (k * pw, 16))
            done = i >= len(frames_k) - 1
            outcome = ("success" if metrics.get(f"success_{k + 1}", 0) > 0 else "no success") if done else "..."
            draw.text((k * pw + 4, 2), f"attempt {k + 1}: {outcome}", fill="black")
        for j, line in enumerate(lines):
            draw.text((4, ph + 18 + 14 * j), line, fill="black")
        frames.append(canvas.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    return frames


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder with a checkpoint (trained with --save-model)")
    parser.add_argument("--seed", type=int, default=0, help="draws the meta-rollout (layout or goal) and the actions")
    parser.add_argument("--caption", default="", help="text under the panels; '\\n' starts a second line")
    parser.add_argument("--out", default="docs/figures/adaptation.gif", help="the GIF to write")
    parser.add_argument("--scale", type=float, default=1.0, help="panel size relative to the env's frame")
    parser.add_argument("--ms", type=int, default=120, help="milliseconds per frame")
    opts = parser.parse_args()
    if not os.path.exists(os.path.join(opts.run_dir, "checkpoint", "state.pt")):
        parser.error(f"{opts.run_dir}: no checkpoint/state.pt (train with --save-model)")
    attempts, metrics, task, step = play(opts.run_dir, opts.seed)
    frames = compose(attempts, metrics, opts.caption, opts.scale)
    frames[0].save(opts.out, save_all=True, append_images=frames[1:], duration=opts.ms, loop=0, optimize=True)
    lengths = ", ".join(str(len(a)) for a in attempts)
    kb = os.path.getsize(opts.out) / 1024
    print(f"{opts.out}: {task} at step {step:,}, seed {opts.seed}, attempts of {lengths} frames, {metrics}, {kb:.0f} KB")


if __name__ == "__main__":
    main()
