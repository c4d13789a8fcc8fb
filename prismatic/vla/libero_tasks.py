"""Instructions in the style of LIBERO's tasks, for synthetic data and benchmarks (no dataset needed)."""

INSTRUCTIONS = (
    "put the black bowl on the plate",
    "open the top drawer of the cabinet",
    "pick up the alphabet soup and place it in the basket",
    "turn on the stove",
    "put the wine bottle on top of the cabinet",
    "push the plate to the front of the stove",
    "put the cream cheese in the bowl",
    "stack the black bowl on the other black bowl",
)
