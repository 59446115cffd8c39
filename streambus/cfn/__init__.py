"""The CFN Loop on the bus: what the blocking coordination exists for.

``loop`` (the epic/phase state machine, as events), ``consensus`` (Loop 3 gate, Loop 2
verdicts), ``decision`` (Loop 4 Product Owner), and the ``demo`` that runs them with real
processes (``streambus demo``).
"""
