"""The TensorRT path: `dgrt build` (build.py), the backend (backend.py), and the pure logic both use
(plan.py: profiles, flags, engine key; targets.py: what each GPU runs). TensorRT is imported lazily."""
