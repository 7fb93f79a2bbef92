"""Tiny ImageWAM-shaped reference model: a world pass that yields per-layer K/V
and a flow-matching action expert that attends to them.

It exists so the runtime, the exporter and the tests have a real two-stage model
to run end to end; its weights are random (torch.manual_seed(0)), so its actions
mean nothing beyond staying near a safe nominal pose.
"""

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

G1_JOINTS = (
    "left_hip_pitch", "left_hip_roll", "left_hip_yaw", "left_knee",
    "left_ankle_pitch", "left_ankle_roll",
    "right_hip_pitch", "right_hip_roll", "right_hip_yaw", "right_knee",
    "right_ankle_pitch", "right_ankle_roll",
    "waist_yaw", "waist_roll", "waist_pitch",
    "left_shoulder_pitch", "left_shoulder_roll", "left_shoulder_yaw",
    "left_elbow", "left_wrist_roll", "left_wrist_pitch", "left_wrist_yaw",
    "right_shoulder_pitch", "right_shoulder_roll", "right_shoulder_yaw",
    "right_elbow", "right_wrist_roll", "right_wrist_pitch", "right_wrist_yaw",
)
UPPER_BODY = tuple(range(12, 29))          # waist + both arms: the action space
ACTION_JOINTS = tuple(G1_JOINTS[i] for i in UPPER_BODY)

CAMERAS = ("head", "left_wrist", "right_wrist")
IMAGE_SIZE = 64
PATCH = 8
WIDTH = 64
HEADS = 4
HEAD_DIM = WIDTH // HEADS
LAYERS = 2
HORIZON = 32
STEP_S = 0.02
STATE_DIM = len(G1_JOINTS)
ACTION_DIM = len(ACTION_JOINTS)
TOKENS_PER_CAMERA = (IMAGE_SIZE // PATCH) ** 2
WORLD_TOKENS = TOKENS_PER_CAMERA * len(CAMERAS)

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
STATE_MEAN = tuple(0.0 for _ in G1_JOINTS)
STATE_STD = tuple(0.5 for _ in G1_JOINTS)
# Safe nominal pose: arms slightly out and bent; 0.05 rad std keeps random
# weights a few tenths of a radian around it.
_NOMINAL = {16: 0.2, 18: 0.3, 23: -0.2, 25: 0.3}
ACTION_MEAN = tuple(_NOMINAL.get(i, 0.0) for i in UPPER_BODY)
ACTION_STD = tuple(0.05 for _ in UPPER_BODY)

KV_NAMES = tuple(
    "kv_%d_%s" % (layer, part) for layer in range(LAYERS) for part in ("k", "v")
)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain matmul/softmax attention: exports to MatMul/Softmax, which every
    backend (TensorRT included) handles, unlike fused SDPA."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def split_heads(x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(b, n, WIDTH)


class Mlp(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))


class PreLnBlock(nn.Module):
    """The parts both kinds of layer share: pre-LN attention projections and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = Mlp()


class WorldLayer(PreLnBlock):
    """Pre-LN self-attention block that also hands out its K and V."""

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (split_heads(p) for p in self.qkv(self.norm1(h)).chunk(3, dim=-1))
        h = h + self.proj(merge_heads(attention(q, k, v)))
        h = h + self.mlp(self.norm2(h))
        return h, k, v


class WorldModel(nn.Module):
    """Stage "world": one image-editing pass over all cameras' patch tokens.

    Nothing is decoded; the action expert only needs each layer's K/V, so those
    are the outputs (kv_<layer>_k / kv_<layer>_v, each (1, heads, 192, 16)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH)
        self.pos = nn.Parameter(0.02 * torch.randn(1, TOKENS_PER_CAMERA, WIDTH))
        self.camera = nn.Parameter(0.02 * torch.randn(len(CAMERAS), 1, WIDTH))
        self.layers = nn.ModuleList(WorldLayer() for _ in range(LAYERS))

    def forward(self, *images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        tokens = [
            self.patch(img).flatten(2).transpose(1, 2) + self.pos + self.camera[i]
            for i, img in enumerate(images)
        ]
        h = torch.cat(tokens, dim=1)
        kv: List[torch.Tensor] = []
        for layer in self.layers:
            h, k, v = layer(h)
            kv += [k, v]
        return tuple(kv)


class ExpertLayer(PreLnBlock):
    """Action tokens attend to the world K/V of the same depth plus themselves."""

    def forward(self, h: torch.Tensor, world_k: torch.Tensor, world_v: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(p) for p in self.qkv(self.norm1(h)).chunk(3, dim=-1))
        k = torch.cat([world_k, k], dim=2)
        v = torch.cat([world_v, v], dim=2)
        h = h + self.proj(merge_heads(attention(q, k, v)))
        return h + self.mlp(self.norm2(h))


class ActionExpert(nn.Module):
    """Stage "action_expert": flow-matching velocity v(x_t, t | state, world K/V)."""

    def __init__(self) -> None:
        super().__init__()
        self.action_in = nn.Linear(ACTION_DIM, WIDTH)
        self.action_pos = nn.Parameter(0.02 * torch.randn(1, HORIZON, WIDTH))
        self.state_in = nn.Linear(STATE_DIM, WIDTH)
        self.time_mlp = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        half = WIDTH // 2
        # exp on the host's libm, not torch's vectorised exp: that one differs in the last bit between CPUs, and the
        # committed reference export must be byte-identical wherever it is regenerated
        exponents = (-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half).tolist()
        freqs = torch.tensor([math.exp(e) for e in exponents], dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        self.layers = nn.ModuleList(ExpertLayer() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, ACTION_DIM)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor,
                *kv: torch.Tensor) -> torch.Tensor:
        angles = (t * 1000.0)[:, None] * self.freqs[None, :]
        t_emb = self.time_mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))
        actions = self.action_in(x_t) + self.action_pos + t_emb[:, None, :]
        state_tok = (self.state_in(state) + t_emb)[:, None, :]
        h = torch.cat([state_tok, actions], dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h, kv[2 * i], kv[2 * i + 1])
        return self.out(self.norm(h[:, 1:, :]))


def build_reference() -> Tuple[WorldModel, ActionExpert]:
    """Both stages with the fixed seed, in eval mode; same weights every call."""
    torch.manual_seed(0)
    world = WorldModel().eval()
    expert = ActionExpert().eval()
    return world, expert


def example_inputs() -> Dict[str, Tuple[torch.Tensor, ...]]:
    """Example tensors per stage (shapes and dtypes are what gets exported)."""
    images = tuple(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE) for _ in CAMERAS)
    kv = tuple(torch.zeros(1, HEADS, WORLD_TOKENS, HEAD_DIM) for _ in KV_NAMES)
    expert = (torch.zeros(1, HORIZON, ACTION_DIM), torch.ones(1), torch.zeros(1, STATE_DIM)) + kv
    return {"world": images, "action_expert": expert}


def shifted_time(t: float, shift: float) -> float:
    return shift * t / (1.0 + (shift - 1.0) * t)


@torch.no_grad()
def reference_step(model_world: WorldModel, model_expert: ActionExpert,
                   images: Sequence[torch.Tensor], state: torch.Tensor,
                   noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """One policy step exactly as the runtime does it, in torch.

    images: preprocessed (1, 3, 64, 64) per camera in CAMERAS order; state:
    normalised (1, 29); noise: (1, 32, 17). Returns normalised actions
    (1, 32, 17). Convention: x_t = t*noise + (1-t)*data, v = noise - data,
    t from 1 to 0 on a shifted uniform grid.
    """
    kv = model_world(*images)
    x = noise.clone()
    for i in range(steps):
        t_now = shifted_time(1.0 - i / steps, shift)
        t_next = shifted_time(1.0 - (i + 1) / steps, shift)
        t = torch.tensor([t_now], dtype=torch.float32)
        v = model_expert(x, t, state, *kv)
        x = x + float(t_next - t_now) * v
    return x
