"""The pictures of the three tasks (docs/method.md §1): one legend per task, shared with the prompts,
and one cached PIL tile a cell, so the symbolic state can be read back from the pixels; or, with
style "sprites", FrozenLake as gymnasium draws it (the VSP benchmark's pictures)."""
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw

# One legend per task: (role, how the prompt describes it, RGB at the cell centre). The renderer
# paints exactly these centre colours and the prompts quote exactly these descriptions (method.md §10).
LEGEND = {
    "frozenlake": (("frozen", "ice-blue cells are frozen (safe)", (190, 225, 250)),
                   ("hole", "dark navy cells are holes", (20, 30, 70)),
                   ("goal", "the red gift box with a gold ribbon is the goal", (250, 200, 30)),
                   ("player", "the purple figure is the player", (130, 60, 190))),
    "maze": (("corridor", "white cells are corridors, black bars are walls", (255, 255, 255)),
             ("player", "the yellow dot is the player", (250, 210, 0)),
             ("target", "the blue dot is the target", (30, 90, 230))),
    "minibehaviour": (("floor", "white cells are free floor", (255, 255, 255)),
                      ("table", "tan cells are the table", (210, 180, 140)),
                      ("printer", "the blue box is the printer", (30, 90, 230)),
                      ("agent", "the red triangle is the agent", (220, 30, 30))),
}
COLOR = {task: {role: rgb for role, _, rgb in rows} for task, rows in LEGEND.items()}


# Detail colours that never sit at a cell centre.
INK = {"ice_line": (110, 150, 190), "gift": (210, 40, 40), "skin": (250, 210, 170), "wall": (0, 0, 0),
       "light_grey": (200, 200, 200), "floor_line": (90, 90, 90), "table_line": (170, 140, 100)}
BORDER = {"frozenlake": INK["ice_line"], "maze": INK["wall"], "minibehaviour": INK["floor_line"]}


def geometry(n, size, cell=None):
    """Cell side in pixels and the margin: cell (r, c) spans x in [margin + c*cell, margin + (c+1)*cell).
    With `cell` given (tiny models: 32, one merged vision token) the grid sits at the top-left corner,
    so cell (r, c) is the same vision token at every level."""
    if cell:
        return cell, 0
    cell = size // n
    return cell, (size - n * cell) // 2


@lru_cache(maxsize=None)
def _tile(task, key, s):
    """One cell whose content is `key`, drawn once per size."""
    col = COLOR[task]
    img = Image.new("RGB", (s, s), col.get("frozen", col.get("floor", col.get("corridor"))))
    d = ImageDraw.Draw(img)
    box = lambda f0, f1: [round(f0 * s), round(f0 * s), round(f1 * s) - 1, round(f1 * s) - 1]
    mid, w = s // 2, max(2, s // 7)
    if task == "frozenlake":
        d.rectangle([0, 0, s - 1, s - 1], outline=INK["ice_line"])
        if key == "hole":
            d.ellipse(box(0.1, 0.9), fill=col["hole"])
        elif key == "goal":  # a red gift box; its gold ribbon crosses the cell centre
            d.rectangle(box(0.2, 0.8), fill=INK["gift"])
            d.rectangle([mid - w // 2, round(0.2 * s), mid - w // 2 + w - 1, round(0.8 * s) - 1], fill=col["goal"])
            d.rectangle([round(0.2 * s), mid - w // 2, round(0.8 * s) - 1, mid - w // 2 + w - 1], fill=col["goal"])
        elif key == "player":  # a head over a purple robe that covers the cell centre
            d.ellipse([round(0.36 * s), round(0.1 * s), round(0.64 * s), round(0.38 * s)], fill=INK["skin"])
            d.polygon([(0.38 * s, 0.4 * s), (0.62 * s, 0.4 * s), (0.75 * s, 0.9 * s), (0.25 * s, 0.9 * s)], fill=col["player"])
    elif task == "maze":  # key = (open directions, content); each cell draws its half of every wall
        open_dirs, content = key
        wall = max(2, s // 8)
        d.rectangle([0, 0, s - 1, s - 1], outline=INK["light_grey"])
        sides = {"U": [0, 0, s - 1, wall - 1], "D": [0, s - wall, s - 1, s - 1],
                 "L": [0, 0, wall - 1, s - 1], "R": [s - wall, 0, s - 1, s - 1]}
        for a, rect in sides.items():
            if a not in open_dirs:
                d.rectangle(rect, fill=INK["wall"])
        for x in (0, s - wall):  # wall posts at the corners
            for y in (0, s - wall):
                d.rectangle([x, y, x + wall - 1, y + wall - 1], fill=INK["wall"])
        if content:
            d.ellipse(box(0.22, 0.78), fill=col[content])
    else:
        d.rectangle([0, 0, s - 1, s - 1], fill=col["table"] if key == "table" else col["floor"],
                    outline=INK["table_line"] if key == "table" else INK["floor_line"])
        if key == "printer":  # a blue box with a grey paper tray at the top
            d.rectangle(box(0.2, 0.8), fill=col["printer"])
            d.rectangle([round(0.3 * s), round(0.2 * s), round(0.7 * s) - 1, round(0.3 * s)], fill=INK["light_grey"])
        elif key == "agent":
            d.polygon([(s / 2, 0.1 * s), (0.88 * s, 0.88 * s), (0.12 * s, 0.88 * s)], fill=col["agent"])
    return img


def cell_roles(state):
    """{(r, c): role} for every cell, roles from LEGEND[task]."""
    task, n = state["task"], state["level"]
    roles = {p: ("frozen" if task == "frozenlake" else "corridor" if task == "maze" else "floor") for p in ((r, c) for r in range(n) for c in range(n))}
    if task == "frozenlake":
        roles.update({tuple(p): "hole" for p in state["holes"]})
        roles[tuple(state["goal"])], roles[tuple(state["start"])] = "goal", "player"
    elif task == "maze":
        roles[tuple(state["target"])], roles[tuple(state["start"])] = "target", "player"
    else:
        roles.update({tuple(p): "table" for p in state["table"]})
        roles[tuple(state["printer"])], roles[tuple(state["agent"])] = "printer", "agent"
    return roles


# --frozenlake-style sprites: FrozenLake as gymnasium (<= 1.3) draws it, the style of the VSP benchmark's pictures
# and of the reference's training images: every cell ice, then the hole, the goal's gift or the start's stool,
# a light-blue outline, and the elf (facing down) on the player's cell; each sprite scaled to the cell.
SPRITES = {"frozen": ("ice",), "hole": ("ice", "hole"), "goal": ("ice", "goal"), "player": ("ice", "stool", "elf_down")}
STYLES = ("plain", "sprites")


def sprite_folder():
    """gymnasium's toy-text image folder, found without importing gymnasium; one-line ValueError without it."""
    import importlib.util

    spec = importlib.util.find_spec("gymnasium")
    folder = Path(spec.submodule_search_locations[0]) / "envs" / "toy_text" / "img" if spec else None
    if folder is None or not all((folder / f"{name}.png").is_file() for names in SPRITES.values() for name in names):
        raise ValueError("--frozenlake-style sprites needs gymnasium's classic FrozenLake sprites (ice.png, elf_down.png, "
                         "...): pip install 'gymnasium<1.4' (1.4 replaced them)")
    return folder


@lru_cache(maxsize=None)
def _sprite_cell(role, s):
    folder, cell = sprite_folder(), Image.new("RGBA", (s, s))
    for name in SPRITES[role]:  # pygame.transform.scale, as gymnasium uses, is nearest-neighbour
        cell.alpha_composite(Image.open(folder / f"{name}.png").convert("RGBA").resize((s, s), Image.NEAREST))
    ImageDraw.Draw(cell).rectangle([0, 0, s - 1, s - 1], outline=(180, 200, 230))
    return cell.convert("RGB")


def render(state, size=256, cell=None, style="plain"):
    """RGB picture of the initial state, size x size pixels: one cached tile a cell (no assets unless style is
    "sprites": FrozenLake as gymnasium draws it)."""
    task, n = state["task"], state["level"]
    cell, margin = geometry(n, size, cell)
    sprites = style == "sprites" and task == "frozenlake"
    img = Image.new("RGB", (size, size), (180, 200, 230) if sprites else BORDER[task])
    for (r, c), role in cell_roles(state).items():
        key = (state["open"][r][c], "" if role == "corridor" else role) if task == "maze" else role
        img.paste(_sprite_cell(role, cell) if sprites else _tile(task, key, cell), (margin + c * cell, margin + r * cell))
    return img
