"""Capture: what runs while a step trains. Module hooks (``recorder``, its compiled twin
``native._hotpath``) turn module calls and autograd nodes into events in a bounded
``buffer``; ``registry`` names modules; ``tracker`` is the drop-in ``ModuleTracker``;
``compile_guard``, ``compiled_detail`` and ``compile_safe_hooks`` keep the hooks right
under torch.compile. Nothing here formats or writes anything."""
