"""Is a cell's position readable from its merged vision token in the same way whatever the cell shows?

Linear probes (25 classes: which of the 5x5 tokens) on the frozen random vision tower of the shipped
base, at the miniature's layout (160 px, 32-px cells, one merged token a cell). One probe is fitted on
the tokens of objects in the base's generic grid pictures (white floor) and applied to the tokens of
the task objects whose position stage 1 must teach; a second probe is fitted on half of each kind of
token and scored on the other half. Run from the repository root:

    python results/mini/position_probe.py
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import envs  # noqa: E402
from mgsd import common, grids, pictures  # noqa: E402

torch.manual_seed(0)
model, processor = common.load_model(ROOT / "models" / "mini-base")


def tokens(picture):
    """The picture's 25 merged vision tokens, [25, hidden], row-major over the 5x5 cells."""
    chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "?"}]}]
    batch = common.encode_prompts(processor, [chat])
    with torch.no_grad():
        return model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]


def samples(count, make):
    """(tokens of the marked cells, their cell index) over `count` pictures; make(i) -> (picture, cells) or None."""
    xs, ys = [], []
    for i in range(count):
        made = make(i)
        if made is not None:
            picture, cells = made
            t = tokens(picture)
            xs += [t[r * 5 + c] for r, c in cells]
            ys += [r * 5 + c for r, c in cells]
    return torch.stack(xs), torch.tensor(ys)


def grid_objects(i):
    grid = grids.make_grid(i, (5,))
    return grids.draw_grid(grid), list(grid["objects"])


def task_object(task, level, key):
    def make(i):
        state = envs.generate(task, level, 10**6 + i)
        return None if state is None else (pictures.render(state, 160, 32), [tuple(state[key])])
    return make


def fit(x, y):
    """A softmax regression on standardised features; returns its accuracy function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = torch.zeros(x.shape[1], 25, requires_grad=True), torch.zeros(25, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy((x - mu) / sd @ w + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda x2, y2: (((x2 - mu) / sd @ w + b).argmax(-1) == y2).float().mean().item()


kinds = {"grid objects (white floor)": samples(300, grid_objects),
         "FrozenLake 4: player": samples(300, task_object("frozenlake", 4, "start")),
         "Maze 3: player": samples(300, task_object("maze", 3, "start")),
         "MiniBehaviour 5: agent": samples(300, task_object("minibehaviour", 5, "agent")),
         "MiniBehaviour 5: printer": samples(300, task_object("minibehaviour", 5, "printer"))}
grid_x, grid_y = kinds["grid objects (white floor)"]
half = len(grid_x) // 2
from_grids = fit(grid_x[:half], grid_y[:half])
print("| tokens | n | probe fitted on grid objects | probe fitted on half of these, scored on the rest |")
print("|---|---|---|---|")
for name, (x, y) in kinds.items():
    k = len(x) // 2
    transfer = from_grids(x[half:], y[half:]) if x is grid_x else from_grids(x, y)
    print(f"| {name} | {len(x)} | {100 * transfer:.1f} | {100 * fit(x[:k], y[:k])(x[k:], y[k:]):.1f} |")
