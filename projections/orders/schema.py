"""The orders write model: normalized tables, owned by the command handlers."""

from __future__ import annotations

from engine import Migration

ORDERS_MIGRATIONS = (
    Migration(
        "orders-0001-write-model",
        """
        CREATE TABLE customers (
            id         uuid PRIMARY KEY,
            name       text NOT NULL,
            email      text NOT NULL,
            version    integer NOT NULL,
            created_at timestamptz NOT NULL
        );
        CREATE UNIQUE INDEX customers_email ON customers (lower(email));
        CREATE TABLE products (
            id         uuid PRIMARY KEY,
            name       text NOT NULL,
            price      numeric(12, 2) NOT NULL CHECK (price > 0),
            version    integer NOT NULL,
            created_at timestamptz NOT NULL
        );
        CREATE TABLE orders (
            id               uuid PRIMARY KEY,
            customer_id      uuid NOT NULL REFERENCES customers (id),
            status           text NOT NULL,
            street           text NOT NULL,
            city             text NOT NULL,
            postal_code      text NOT NULL,
            country          text NOT NULL,
            total            numeric(14, 2) NOT NULL,
            tracking_number  text,
            carrier          text,
            cancel_reason    text,
            version          integer NOT NULL,
            created_at       timestamptz NOT NULL,
            updated_at       timestamptz NOT NULL,
            confirmed_at     timestamptz,
            shipped_at       timestamptz,
            delivered_at     timestamptz,
            cancelled_at     timestamptz
        );
        CREATE INDEX orders_customer ON orders (customer_id, created_at DESC);
        CREATE TABLE order_items (
            order_id     uuid NOT NULL REFERENCES orders (id),
            line_no      integer NOT NULL,
            product_id   uuid NOT NULL REFERENCES products (id),
            product_name text NOT NULL,
            quantity     integer NOT NULL CHECK (quantity > 0),
            unit_price   numeric(12, 2) NOT NULL,
            PRIMARY KEY (order_id, line_no)
        );
        """,
    ),
)
