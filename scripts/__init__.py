"""Operations: the `mnemo` command, the embedded servers, the demo renter bot."""
