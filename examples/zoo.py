"""Zoo: bundled models with planted mechanisms, and the cards that name what a scan must find."""

import causalscan as cs

print(cs.zoo.names())  # ['backdoor', 'facts', 'induction']
print(cs.zoo.card("induction")["components"])  # the heads a correct scan must find
print(cs.zoo.check(cs.load("induction")))  # [] when every claim of the card holds
