class GenerationMixin:
    pass
