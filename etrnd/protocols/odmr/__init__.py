"""ODMR (RFC 2645): the ATRN client, the reversed SMTP role, and the office MTA leg."""
