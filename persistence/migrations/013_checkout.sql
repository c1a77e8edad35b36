-- 013_checkout: a card payment made on Stripe Checkout, Stripe's hosted payment page (the web
-- app's card top-up: the page loads no script of Stripe's, and the card number never reaches
-- the exchange). The payment is a card_payments row like any other; the session is where the
-- payer pays, and its PaymentIntent, once made, is recorded in payment_intent_id and credited
-- by the same rules (gateway/payments/stripe_cards.py).
ALTER TABLE card_payments
    ADD COLUMN checkout_session_id varchar(255) UNIQUE,
    ADD COLUMN checkout_url        text;
