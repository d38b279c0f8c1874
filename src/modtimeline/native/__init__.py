"""Native: the optional compiled parts. ``extensions`` defines them (for setup.py and
``modtimeline build``), ``build`` compiles them after install, ``loader`` imports them
and says why one is not in use. Sources: ``_hotpath.cpp`` (recording), ``_resolve_cpu.cpp``
(host-only resolve), ``_layout.h`` (the event layout both include)."""
