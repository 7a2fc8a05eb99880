"""SPA's model maths: backbone interface, side network, gate, decoding, training."""
