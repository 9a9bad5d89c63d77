"""Changing a store safely: the actions a finding's repair consists of, the journal that makes
a kill -9 survivable, and the executor that takes the runtime's locks and runs a plan."""
