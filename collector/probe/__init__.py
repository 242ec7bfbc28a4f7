"""The probe: the only code that touches bcc. It loads and attaches the BPF program, drains
its maps into plain records and writes what the BPF side reads."""
