//! The layout of the pinned state: what an agent started later (or a newer
//! `lb`) must agree with before it adopts the maps a previous agent left in
//! bpffs.
//!
//! Each map's type, key size, value size and capacity are compared with the
//! kernel's own record of the pinned map, so a change of any `#[repr(C)]`
//! type is caught without help. [`LAYOUT_VERSION`] covers what sizes cannot
//! show: a field that changes meaning but not size. Bump it with any such
//! change; an agent refuses pinned state of another version rather than
//! misread it.

/// Version of the meaning of the maps' contents. Bump it when a key or value
/// keeps its size but changes what a field means (or what a map is for).
///
/// - 1: the first pinned layout.
/// - 2: per-client limits: `FLOW_F_COUNTED` in a flow's flags and
///   `VIP_F_LIMITED` in a VIP's (a version-1 program would neither set nor
///   read them, so flows it pinned would never be counted down); a flow's
///   own timeouts where its entry had padding.
/// - 3: `HANDSHAKES`, the per-backend handshake counters of passive health
///   (a new map: a version-2 program would not count into it);
///   `BACKEND_STATS` counts each direction apart (its value grew, which
///   the size check sees too) and `VIP_STATS` is gone.
pub const LAYOUT_VERSION: u32 = 3;

/// Name, in the pin directory, of the symlink that records the layout: its
/// target is [`LAYOUT_TAG_PREFIX`] followed by the decimal version. (A bpffs
/// holds pins, directories and symlinks, but no regular files, so the tag is
/// a symlink's target.)
pub const LAYOUT_PIN: &str = "LAYOUT";

/// What the [`LAYOUT_PIN`] symlink's target starts with.
pub const LAYOUT_TAG_PREFIX: &str = "lb-layout-v";

/// Prefix of a link's pin: `link_<interface>`.
pub const LINK_PIN_PREFIX: &str = "link_";
