/// The guest ranges a copy reads, in order, each rounded out to whole units of
/// the output's grain (its cluster size) and clipped to the disk, touching ranges merged.
public struct CopyPlan: Sendable, Equatable {
    public private(set) var ranges: [Range<UInt64>] = []
    /// The bytes the ranges cover.
    public private(set) var bytes: UInt64 = 0
    /// The unit ranges are rounded to (1: exact).
    public let grain: UInt64
    public let size: UInt64

    public init(size: UInt64, grain: UInt64) {
        precondition(grain > 0)
        self.size = size
        self.grain = grain
    }

    /// Adds `r` (in order: at or after the ranges added before).
    public mutating func add(_ r: Range<UInt64>) {
        let lo = r.lowerBound / grain * grain
        let hi = min(size, (r.upperBound + grain - 1) / grain * grain)
        guard lo < hi else { return }
        if let last = ranges.last, last.upperBound >= lo {
            if hi > last.upperBound {
                bytes += hi - last.upperBound
                ranges[ranges.count - 1] = last.lowerBound..<hi
            }
        } else {
            ranges.append(lo..<hi)
            bytes += hi - lo
        }
    }

    /// Every range that is data anywhere in the source (what a standalone copy needs:
    /// zeros and holes read as zeros there anyway).
    public static func data(of source: GuestReader, grain: UInt64) throws -> CopyPlan {
        try allocated(in: source, grain: grain, zeros: false)
    }

    /// Every range the source allocates: data, and with `zeros` also zero extents (what a
    /// copy onto an image that holds other data must write: `commit`).
    public static func allocated(in source: GuestReader, grain: UInt64, zeros: Bool) throws -> CopyPlan {
        var plan = CopyPlan(size: source.virtualSize, grain: grain)
        try source.forEachExtent(in: 0..<source.virtualSize) { status in
            if status.kind == .data || (zeros && status.kind == .zero) {
                plan.add(status.start..<(status.start + status.length))
            }
        }
        return plan
    }

    /// The whole disk (a target whose old contents must all be replaced: a block device, a stream).
    public static func whole(size: UInt64, grain: UInt64) -> CopyPlan {
        var plan = CopyPlan(size: size, grain: grain)
        plan.add(0..<size)
        return plan
    }
}
