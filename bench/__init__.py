"""`make bench`: the enforcement against hand-written SQL at scale (see README, Performance)."""
