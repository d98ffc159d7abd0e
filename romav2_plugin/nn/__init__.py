"""The network of RoMa v2: DINOv3 backbone (:mod:`.backbone`), multi-view transformer (:mod:`.vit`), DPT head
(:mod:`.dpt`), the coarse matcher (:mod:`.matcher`), fine features (:mod:`.fine_features`) and the refiners
(:mod:`.refiner`). Assembled by :class:`romav2_plugin.model.RoMaV2`; imports nothing from the commands."""
