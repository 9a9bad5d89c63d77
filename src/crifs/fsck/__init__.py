"""Store checks (``crifs check`` / ``crifs gc``): findings about a store's own bookkeeping.

Where each finding class lives is listed in :mod:`crifs.fsck.catalogue`. The link audit of
image contents (``crifs links``) is a different thing and lives in :mod:`crifs.check`.
"""
