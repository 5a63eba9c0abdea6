"""etrnd: send SMTP ETRN to the ISP's relays when the WAN link comes up."""

__version__ = "0.1.0"
