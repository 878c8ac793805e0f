//! An allocator that records, per thread, the largest single allocation,
//! the bytes allocated and not yet freed, and the most of those held at
//! once, so a test can check what decoding hostile input costs. Per
//! thread because tests run in parallel. Shared by the test binaries that
//! include this file (`#[path]`); each uses what it needs.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct TrackingAllocator;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// `size` bytes allocated, and `freed` freed.
fn note(size: usize, freed: usize) {
    // `try_with` because the allocator also runs while thread locals are torn down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + size as isize - freed as isize);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
}

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size, layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Runs `f` and returns its result with the largest allocation it made.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

/// Runs `f` and returns its result with the bytes it allocated that are
/// still held when it returns (by the result, since `f` keeps nothing else).
pub fn retained_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.with(Cell::get);
    let r = f();
    let after = LIVE.with(Cell::get);
    (r, usize::try_from(after - before).unwrap_or(0))
}

/// Runs `f` and returns its result with the most bytes held at once while
/// it ran, beyond those held before.
pub fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, usize::try_from(peak - before).unwrap_or(0))
}
