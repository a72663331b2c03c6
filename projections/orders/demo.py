"""The orders demo sample: customers and orders moving through their life cycle.

``plan_sample`` is pure: it turns a size and a seed into data (customers, orders
with their items and the steps each goes through). ``load_orders_demo`` sends
that plan through the CommandBus, wave by wave: products, customers, every
order's creation, then every order's first step, second step, and so on, so the
event log interleaves many orders' lives as a real shop would.

Reruns. Every id (command, customer, order, product) is derived from the seed
and the entity's number, never drawn fresh, so running the demo again with the
same seed and sizes changes nothing: the CommandBus recognises each command id
and returns the first result (``duplicate``). Each entity draws from its own
random stream, keyed by what it is (``"42/customer/17"``), so a larger
``--orders`` with the same seed keeps the orders it had and adds the rest. An
order's key includes the customer it was drawn for, so ``--customers`` can
change too: an order that now falls to another customer is another order, and
no command id is ever reused with other content (which the bus would refuse).
Emails carry the seed, so samples of different seeds coexist.
"""

from __future__ import annotations

import asyncio
import enum
import random
import unicodedata
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from engine import (
    Command,
    CommandBus,
    CommandResult,
    DemoProgress,
    DemoSize,
    DemoSummary,
    ValidationFailedError,
)
from projections.orders.commands import (
    Address,
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    CreateOrder,
    DeliverOrder,
    OrderItemRequest,
    RegisterCustomer,
    RegisterProduct,
    ShipOrder,
)
from projections.orders.demo_data import (
    CANCEL_REASONS,
    CARRIERS,
    CATALOG,
    CITIES,
    FIRST_NAMES,
    LAST_NAMES,
    STREETS,
)
from projections.orders.rules import ADDRESS_CHANGEABLE, OrderStatus

# Every demo id is uuid5(this, key): fixed forever, so ids stay stable across releases.
DEMO_NAMESPACE = uuid.UUID("0f8d4c52-7e0b-4c7e-9d51-3a6f2b9e8c11")


def demo_id(key: str) -> uuid.UUID:
    return uuid.uuid5(DEMO_NAMESPACE, key)


class Step(enum.Enum):
    """What happens to an order after it is created."""

    CONFIRM = "confirm"
    SHIP = "ship"
    DELIVER = "deliver"
    CANCEL = "cancel"
    CHANGE_ADDRESS = "change address"


STEP_TARGET: dict[Step, OrderStatus | None] = {
    Step.CONFIRM: OrderStatus.CONFIRMED,
    Step.SHIP: OrderStatus.SHIPPED,
    Step.DELIVER: OrderStatus.DELIVERED,
    Step.CANCEL: OrderStatus.CANCELLED,
    Step.CHANGE_ADDRESS: None,  # the status stays
}

# (weight in %, steps): how an order's life goes. Most are delivered; some are
# still on their way, some are cancelled before or after confirmation.
JOURNEYS: tuple[tuple[int, tuple[Step, ...]], ...] = (
    (62, (Step.CONFIRM, Step.SHIP, Step.DELIVER)),
    (12, (Step.CONFIRM, Step.SHIP)),
    (6, (Step.CONFIRM,)),
    (5, ()),
    (6, (Step.CANCEL,)),
    (9, (Step.CONFIRM, Step.CANCEL)),
)
ADDRESS_CHANGE_RATE = 0.08  # of orders, while still changeable (before shipping)
LINE_WEIGHTS = (45, 25, 15, 10, 5)  # orders with 1, 2, ... 5 different products
QUANTITY_WEIGHTS = (70, 18, 8, 4)  # a line of 1, 2, 3, 4 units
# Orders fall to customers unevenly (a few regulars, a long tail): index
# int(n * u ** SKEW) for uniform u puts more orders on low indices.
CUSTOMER_SKEW = 1.3


@dataclass(frozen=True)
class CustomerPlan:
    customer_id: uuid.UUID
    command_id: uuid.UUID
    name: str
    email: str
    home: Address


@dataclass(frozen=True)
class OrderPlan:
    key: str
    order_id: uuid.UUID
    customer: int  # index into SamplePlan.customers
    items: tuple[tuple[int, int], ...]  # (index into CATALOG, quantity), distinct products
    address: Address
    steps: tuple[Step, ...]
    new_address: Address  # where a CHANGE_ADDRESS step moves it (unused without one)
    carrier: str
    tracking_number: str
    cancel_reason: str

    @property
    def final_status(self) -> OrderStatus:
        status = OrderStatus.PENDING
        for step in self.steps:
            status = STEP_TARGET[step] or status
        return status

    @property
    def final_city(self) -> str:
        moved = Step.CHANGE_ADDRESS in self.steps
        return (self.new_address if moved else self.address).city


@dataclass(frozen=True)
class SamplePlan:
    seed: int
    customers: tuple[CustomerPlan, ...]
    orders: tuple[OrderPlan, ...]

    def waves(self) -> list[list[Command]]:
        """Commands in waves: each wave may run concurrently, after the one before it."""
        chains = [order_commands(order, self.customers[order.customer]) for order in self.orders]
        depth = max((len(chain) for chain in chains), default=0)
        return [
            product_commands(),
            [customer_command(customer) for customer in self.customers],
            *([chain[k] for chain in chains if len(chain) > k] for k in range(depth)),
        ]


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _postal_code(rng: random.Random, template: str) -> str:
    return "".join(
        str(rng.randrange(10))
        if ch == "#"
        else chr(ord("A") + rng.randrange(26))
        if ch == "@"
        else ch
        for ch in template
    )


def _address(rng: random.Random) -> Address:
    city, country, template, _ = rng.choices(CITIES, weights=[c[3] for c in CITIES])[0]
    return Address(
        street=f"{rng.randrange(1, 200)} {rng.choice(STREETS)}",
        city=city,
        postal_code=_postal_code(rng, template),
        country=country,
    )


def plan_customer(seed: int, number: int) -> CustomerPlan:
    key = f"{seed}/customer/{number}"
    rng = random.Random(key)
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return CustomerPlan(
        customer_id=demo_id(key),
        command_id=demo_id(f"{key}/register"),
        name=f"{first} {last}",
        email=f"{_ascii(first)}.{_ascii(last)}.{number}@seed{seed}.example.com",
        home=_address(rng),
    )


def _steps(rng: random.Random) -> tuple[Step, ...]:
    weights = [weight for weight, _ in JOURNEYS]
    steps = list(rng.choices([steps for _, steps in JOURNEYS], weights=weights)[0])
    if rng.random() < ADDRESS_CHANGE_RATE:
        statuses = [OrderStatus.PENDING]
        for step in steps:
            statuses.append(STEP_TARGET[step] or statuses[-1])
        changeable = [n for n, status in enumerate(statuses) if status in ADDRESS_CHANGEABLE]
        steps.insert(rng.choice(changeable), Step.CHANGE_ADDRESS)
    return tuple(steps)


def plan_order(seed: int, number: int, customers: Sequence[CustomerPlan]) -> OrderPlan:
    # The customer comes from a stream of its own: how many customers there are
    # must not shift the draws that describe the order.
    pick = random.Random(f"{seed}/order/{number}/customer").random()
    customer = int(len(customers) * pick**CUSTOMER_SKEW)
    key = f"{seed}/order/{number}/customer/{customer}"
    rng = random.Random(key)
    lines = rng.choices(range(1, len(LINE_WEIGHTS) + 1), weights=LINE_WEIGHTS)[0]
    products = rng.sample(range(len(CATALOG)), lines)
    quantities = rng.choices(range(1, len(QUANTITY_WEIGHTS) + 1), QUANTITY_WEIGHTS, k=lines)
    return OrderPlan(
        key=key,
        order_id=demo_id(key),
        customer=customer,
        items=tuple(zip(products, quantities, strict=True)),
        address=customers[customer].home,
        steps=_steps(rng),
        new_address=_address(rng),
        carrier=rng.choice(CARRIERS),
        tracking_number=f"TRK{rng.randrange(10**11):011d}",
        cancel_reason=rng.choice(CANCEL_REASONS),
    )


def plan_sample(size: DemoSize, seed: int) -> SamplePlan:
    """The sample for ``size`` and ``seed``: the same arguments give the same plan."""
    if size.orders and not size.customers:
        raise ValidationFailedError("customers", "orders need at least one customer")
    customers = tuple(plan_customer(seed, n) for n in range(size.customers))
    orders = tuple(plan_order(seed, n, customers) for n in range(size.orders))
    return SamplePlan(seed, customers, orders)


def product_id(index: int) -> uuid.UUID:
    name, price = CATALOG[index]
    return demo_id(f"product/{name}/{price}")


def product_commands() -> list[Command]:
    # Shared by every seed; the key holds the price, so a repriced product is a new one
    # instead of a command id reused with other content.
    return [
        RegisterProduct(
            command_id=demo_id(f"product/{name}/{price}/register"),
            product_id=product_id(index),
            name=name,
            price=price,
        )
        for index, (name, price) in enumerate(CATALOG)
    ]


def customer_command(customer: CustomerPlan) -> RegisterCustomer:
    return RegisterCustomer(
        command_id=customer.command_id,
        customer_id=customer.customer_id,
        name=customer.name,
        email=customer.email,
    )


def _step_command(order: OrderPlan, number: int, step: Step) -> Command:
    command_id = demo_id(f"{order.key}/{number}/{step.name}")
    match step:
        case Step.CONFIRM:
            return ConfirmOrder(command_id=command_id, order_id=order.order_id)
        case Step.SHIP:
            return ShipOrder(
                command_id=command_id,
                order_id=order.order_id,
                tracking_number=order.tracking_number,
                carrier=order.carrier,
            )
        case Step.DELIVER:
            return DeliverOrder(command_id=command_id, order_id=order.order_id)
        case Step.CANCEL:
            return CancelOrder(
                command_id=command_id, order_id=order.order_id, reason=order.cancel_reason
            )
        case Step.CHANGE_ADDRESS:
            return ChangeShippingAddress(
                command_id=command_id, order_id=order.order_id, shipping_address=order.new_address
            )


def order_commands(order: OrderPlan, customer: CustomerPlan) -> list[Command]:
    """The order's creation, then one command per step, in order."""
    create = CreateOrder(
        command_id=demo_id(f"{order.key}/create"),
        order_id=order.order_id,
        customer_id=customer.customer_id,
        items=[
            OrderItemRequest(product_id=product_id(index), quantity=quantity)
            for index, quantity in order.items
        ],
        shipping_address=order.address,
    )
    steps = [_step_command(order, n, step) for n, step in enumerate(order.steps, start=1)]
    return [create, *steps]


def _samples(plan: SamplePlan) -> dict[str, str]:
    """Ids for example queries: the busiest customer, one of their orders and its city."""
    if not plan.customers:
        return {}
    per_customer = Counter(order.customer for order in plan.orders)
    busiest = min(per_customer, key=lambda c: (-per_customer[c], c), default=0)
    customer = plan.customers[busiest]
    samples = {"customer_id": str(customer.customer_id), "customer_name": customer.name}
    theirs = [order for order in plan.orders if order.customer == busiest]
    delivered = [o for o in theirs if o.final_status is OrderStatus.DELIVERED]
    if theirs:
        order = (delivered or theirs)[0]
        samples |= {"order_id": str(order.order_id), "city": order.final_city}
    else:
        samples["city"] = customer.home.city
    return samples


def summarize(plan: SamplePlan, commands: int, new: int) -> DemoSummary:
    by_status = Counter(order.final_status for order in plan.orders)
    return DemoSummary(
        seed=plan.seed,
        commands=commands,
        new=new,
        duplicates=commands - new,
        counts={
            "products": len(CATALOG),
            "customers": len(plan.customers),
            "orders": len(plan.orders),
            "order_lines": sum(len(order.items) for order in plan.orders),
            "address_changes": sum(Step.CHANGE_ADDRESS in order.steps for order in plan.orders),
        },
        breakdowns={"orders_by_status": {s.value: by_status[s] for s in OrderStatus}},
        samples=_samples(plan),
    )


@dataclass
class _Tally:
    total: int
    progress: DemoProgress
    done: int = 0
    new: int = 0

    def add(self, result: CommandResult) -> None:
        self.done += 1
        self.new += not result.duplicate
        self.progress(self.done, self.total)


async def _run_wave(
    bus: CommandBus, commands: Sequence[Command], concurrency: int, tally: _Tally
) -> None:
    """Run ``commands`` with at most ``concurrency`` in flight; the first failure stops all."""
    pending = iter(commands)  # shared: each worker takes the next one not taken yet

    async def worker() -> None:
        for command in pending:
            tally.add(await bus.execute(command))

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(commands))):
                group.create_task(worker())
    except ExceptionGroup as failed:
        # Callers map engine errors to exit codes: hand them the error itself,
        # with the driver error it came from.
        first = failed.exceptions[0]
        raise first from first.__cause__


async def load_orders_demo(
    bus: CommandBus, size: DemoSize, seed: int, concurrency: int, progress: DemoProgress
) -> DemoSummary:
    """Load the orders sample through ``bus``; idempotent for the same seed and sizes."""
    plan = plan_sample(size, seed)
    waves = plan.waves()
    tally = _Tally(total=sum(len(wave) for wave in waves), progress=progress)
    progress(0, tally.total)
    for wave in waves:
        await _run_wave(bus, wave, concurrency, tally)
    return summarize(plan, tally.done, tally.new)
