"""``MVTec``: the name Anomalib 1.x and older tutorials use for the MVTec AD datamodule, renamed ``MVTecAD`` in 2.x.

``anomalib train --model UFlowNFA --data MVTec`` then works as written in older docs. The alias is Anomalib's own
:class:`~anomalib.data.MVTecAD` unchanged: same arguments, same samples, and the same results folder
(``<default_root_dir>/<model>/MVTecAD/<category>/``), because :attr:`name` reports ``MVTecAD``. It warns once per
process that ``MVTec`` is the old name.
"""

from __future__ import annotations

import functools
import warnings

from anomalib.data import MVTecAD

_warned = False


class MVTec(MVTecAD):
    """Old name of Anomalib's :class:`~anomalib.data.MVTecAD`; takes exactly its arguments."""

    @functools.wraps(MVTecAD.__init__)  # the CLI and help read MVTecAD's signature and documentation
    def __init__(self, *args: object, **kwargs: object) -> None:
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(
                "`MVTec` is the Anomalib 1.x name of the MVTec AD datamodule; anomalib-ext maps it to Anomalib's "
                "`MVTecAD` (identical arguments, samples and results folder). Use `MVTecAD` in new configs.",
                FutureWarning,
                stacklevel=2,
            )
        super().__init__(*args, **kwargs)

    @property
    def name(self) -> str:
        """``MVTecAD``, so results land where stock ``--data MVTecAD`` puts them."""
        return MVTecAD.__name__
