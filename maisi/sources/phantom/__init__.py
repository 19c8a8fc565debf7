"""Seeded procedural whole-body CT phantoms in Hounsfield units with MAISI label maps.

The phantom is the factory's default data source: every case is fully determined by its
:class:`~maisi.sources.phantom.spec.PhantomSpec` (and so by the run seed, the source name and the case index), it covers
the body regions it was planned for (MAISI's region rule applied to its label map gives back
the planned top and bottom region), and it looks like CT: a body outline with subcutaneous fat,
lungs split into lobes with a vessel tree, mediastinum, abdominal organs, bowel with gas,
a segmented spine, ribs, pelvis and femurs.

Geometry is written in a *template* frame (millimetres, origin at the vertex, ``x`` toward the
patient's right, ``y`` anterior, ``z`` superior so the body lies at negative ``z``) and mapped
to world RAS+ millimetres by the per-case body scale. Every structure is evaluated only inside
its own bounding box as a signed depth field (positive inside, roughly in mm), and structures
are painted in a fixed order so later ones override earlier ones.

Modules: :mod:`.spec` (what a case is), :mod:`.geometry` (signed-depth shapes), :mod:`.body`
(the anatomy), :mod:`.writing` (arrays and files), :mod:`.shard` (a shard of cases for the workflow).
"""
