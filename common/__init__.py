"""The only code shared by import: symlog / two-hot maths and the replay buffer."""
