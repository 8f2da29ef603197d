"""Profile -> feature vector, in original units the segment namer can read back.

Counts and money are log-scaled (log1p) because shopper behaviour is heavy-tailed: a
customer with 40 orders is not 40 times as different from one with 1 as a customer with
1 is from one with 0. Ratios are bounded to [0, 1]; days are capped so one dormant
account does not stretch a whole axis. Tenure's cap is short (a profile half-life by
default): it grows a day a day for every user, drift or not, so it should tell a new
shopper from an established one and then stop moving them.
"""

from __future__ import annotations

import math

from config.settings import ProfileSettings
from worker.profiles import DAY_MS, Profile

FEATURES: tuple[str, ...] = (
    "events_per_session",
    "sessions",
    "orders",
    "conversion",
    "aov",
    "view_to_cart",
    "cart_to_purchase",
    "search_share",
    "price_level",
    "purchase_recency_days",
    "tenure_days",
)

# Features that grow with a profile's age (counts and spans) and those that do not
# (shares, rates, prices): the latter's distribution is steady while behaviour is, even
# as a cold-started population matures.
GROWING: tuple[str, ...] = ("sessions", "orders", "purchase_recency_days", "tenure_days")
RATES: tuple[str, ...] = tuple(name for name in FEATURES if name not in GROWING)

BROWSING = ("page_view", "product_view", "search", "wishlist_add")


class FeatureExtractor:
    """Turns a profile into the model's input: a dict of FEATURES, original units."""

    def __init__(self, settings: ProfileSettings) -> None:
        self._recency_cap = settings.recency_cap_days
        self._tenure_cap = settings.tenure_cap_days

    def __call__(self, profile: Profile) -> dict[str, float]:
        counts = profile.counts
        browsing = sum(counts.get(name, 0.0) for name in BROWSING)
        views = counts.get("product_view", 0.0)
        carts = counts.get("add_to_cart", 0.0)
        purchases = counts.get("purchase", 0.0)
        if profile.last_purchase_ts is None:
            recency = self._recency_cap
        else:
            recency = min((profile.last_ts - profile.last_purchase_ts) / DAY_MS, self._recency_cap)
        return {
            "events_per_session": math.log1p(sum(counts.values()) / max(profile.sessions, 1.0)),
            "sessions": math.log1p(profile.sessions),
            "orders": math.log1p(purchases),
            "conversion": min(purchases / max(profile.sessions, 1.0), 1.0),
            "aov": math.log1p(profile.aov),
            "view_to_cart": min(carts / views, 1.0) if views else 0.0,
            "cart_to_purchase": min(purchases / max(carts, 1.0), 1.0),
            "search_share": counts.get("search", 0.0) / browsing if browsing else 0.0,
            "price_level": math.log1p(profile.mean_price),
            "purchase_recency_days": max(recency, 0.0),
            "tenure_days": min((profile.last_ts - profile.first_ts) / DAY_MS, self._tenure_cap),
        }
