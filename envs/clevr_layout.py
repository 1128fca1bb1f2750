"""CLEVR's object attributes and the set-prediction row that encodes an object: one definition that the data's
targets, the set-prediction head, the AP metric and the code/property tables all read (numpy-free, torch-free)."""
import itertools

SHAPES = ("cube", "sphere", "cylinder")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
COLORS = ("gray", "blue", "brown", "yellow", "red", "green", "purple", "cyan")  # one-hot order
MAX_OBJECTS = 10

# Property row, `19`: [x, y, z, size (2), material (2), shape (3), color (8), real flag].
ATTRIBUTES = {"size": SIZES, "material": MATERIALS, "shape": SHAPES, "color": COLORS}  # one-hot blocks, in row order
_ENDS = list(itertools.accumulate((len(values) for values in ATTRIBUTES.values()), initial=3))
ATTRIBUTE_SLICES = {name: slice(a, b) for name, a, b in zip(ATTRIBUTES, _ENDS, _ENDS[1:])}
PROPERTY_DIM = _ENDS[-1] + 1
