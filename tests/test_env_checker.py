"""Every benchmark's env wrapper follows gymnasium's protocol (gymnasium.utils.env_checker.check_env): spaces,
seeding through super().reset(seed=...) so that the same seed gives the same first observation, and step's API."""

import warnings

import pytest
from gymnasium.utils.env_checker import check_env

import amago2_atari
import amago2_babyai
import amago2_metaworld
import amago2_popgym
import amago2_procgen

ENVS = {
    "popgym": lambda: amago2_popgym.POPGymMetaEnv(["RepeatPreviousEasy", "MineSweeperEasy"]),
    "metaworld": lambda: amago2_metaworld.MetaWorldMetaEnv("ML1", "reach-v3", k_episodes=2, episode_length=5),
    "procgen": lambda: amago2_procgen.ProcgenMetaEnv("easy", games=["coinrun", "ninja"]),
    "atari": lambda: amago2_atari.AtariEnv("Pong"),
    "babyai": lambda: amago2_babyai.BabyAIMetaEnv(train=True),
}


@pytest.mark.parametrize("name", sorted(ENVS))
def test_wrapper_passes_gymnasium_env_checker(name):
    env = ENVS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the checker reports protocol slips as warnings: fail on them
        warnings.filterwarnings("ignore", message=".*(render|Box bound precision|np.bool8|infinity).*")
        check_env(env, skip_render_check=True)
    env.close()
