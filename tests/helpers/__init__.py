"""Builders shared by the tests: tiny model parts and data (`tiny_parts`, `tiny_towers`, `families`), sample
conversations (`conversations`), runs of the real CLI (`runs`, `distributed`), and what another stack does with an
output folder (`outputs`, `portable`). Test files import from here, never from each other."""
