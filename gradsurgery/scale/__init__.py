"""Running at scale: :mod:`.amp` (loss scaling under a ``GradScaler``) and
:mod:`.distributed` (exact surgery under ``torch.distributed``)."""
