"""Full recompute, the reference the scripts' KV cache is tested against (test_popgym.py) and timed against
(tools/bench_speed.py): keep each env's last context_len tokens and re-run the whole Transformer every step."""

import torch


class TokenHistory:
    def __init__(self, num_envs: int, context_len: int, d_token: int, device):
        self.tokens = torch.zeros(num_envs, context_len, d_token, device=device)
        self.t = torch.zeros(num_envs, context_len, dtype=torch.long, device=device)
        self.length = torch.zeros(num_envs, dtype=torch.long, device=device)

    def reset(self, envs: torch.Tensor):
        self.length[envs] = 0

    def __call__(self, transformer, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One new token per env: (E, 1, d_token) -> h (E, d_model)."""
        full = self.length >= self.tokens.shape[1]  # sliding window: drop the oldest token
        self.tokens[full], self.t[full] = self.tokens[full].roll(-1, 1), self.t[full].roll(-1, 1)
        pos = self.length.clamp(max=self.tokens.shape[1] - 1)
        envs = torch.arange(len(pos), device=pos.device)
        self.tokens[envs, pos], self.t[envs, pos] = tokens[:, 0], t[:, 0]
        self.length += 1
        n = int(pos.max()) + 1  # causal: the zeros after an env's own tokens do not change its output
        return transformer(self.tokens[:, :n], self.t[:, :n])[envs, pos]
