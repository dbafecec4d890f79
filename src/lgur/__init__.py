"""lgur: text-to-image person re-identification built around LGUR (Shao et al., ACM MM 2022)."""

__version__ = "0.1.0"
