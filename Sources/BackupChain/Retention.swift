import FoundationEssentials
import QCowImage

/// Which points a retention policy keeps, counted as restic's `forget` counts them
/// (internal/restic/snapshot_policy.go): points are taken newest first; each rule with
/// counts left keeps a point whose bucket (the point itself for `last`, its day, ISO week
/// or month for the calendar rules) differs from the bucket of the point that rule kept
/// last, and the oldest point when the rule still has counts left. The union is kept.
public struct RetentionPolicy: Sendable, Equatable {
    /// Keep the newest N points.
    public var last: Int?
    /// The newest point of each of the last D days / W ISO weeks / M months that hold a point.
    public var daily: Int?
    public var weekly: Int?
    public var monthly: Int?
    /// Calendar days, weeks and months count in the local zone (`--local-time`), else in UTC.
    public var localTime: Bool

    public init(last: Int? = nil, daily: Int? = nil, weekly: Int? = nil, monthly: Int? = nil,
                localTime: Bool = false) {
        self.last = last
        self.daily = daily
        self.weekly = weekly
        self.monthly = monthly
        self.localTime = localTime
    }

    public var isEmpty: Bool { [last, daily, weekly, monthly].allSatisfy { $0 == nil } }

    /// Why each point is kept (rule names, as restic's reasons), by stable index; the points
    /// not named go. `layers` in chain order (oldest first).
    public func decide(_ layers: [BackupManifest.Layer]) throws -> Decision {
        var dated: [(layer: BackupManifest.Layer, time: Date)] = []
        for layer in layers {
            guard let time = try? Date(layer.created, strategy: .iso8601) else {
                throw ChainError(.invalidFormat, "layer \(layer.index) has a creation time that is not ISO 8601 ('\(layer.created)'); calendar retention cannot place it")
            }
            dated.append((layer, time))
        }
        // Newest first; a stable sort by time, as restic's (chain order breaks ties).
        let ordered = dated.reversed().enumerated()
            .sorted { $0.element.time != $1.element.time ? $0.element.time > $1.element.time : $0.offset < $1.offset }
            .map(\.element)
        struct Rule {
            var name: String
            var count: Int
            var bucket: (Date, Int) -> Int
            var lastBucket = Int.min
        }
        func day(_ d: Date, _: Int) -> Int { CivilTime(d, localTime: localTime).number("%Y%m%d") }
        func week(_ d: Date, _: Int) -> Int { CivilTime(d, localTime: localTime).number("%G%V") }
        func month(_ d: Date, _: Int) -> Int { CivilTime(d, localTime: localTime).number("%Y%m") }
        var rules: [Rule] = []
        if let last { rules.append(Rule(name: "last", count: last) { _, nr in nr }) }
        if let daily { rules.append(Rule(name: "daily", count: daily, bucket: day)) }
        if let weekly { rules.append(Rule(name: "weekly", count: weekly, bucket: week)) }
        if let monthly { rules.append(Rule(name: "monthly", count: monthly, bucket: month)) }
        var decision = Decision()
        for (nr, point) in ordered.enumerated() {
            var reasons: [String] = []
            for i in rules.indices where rules[i].count > 0 {
                let value = rules[i].bucket(point.time, nr)
                // Like restic, the oldest point is kept too while a rule has counts left.
                if value != rules[i].lastBucket || nr == ordered.count - 1 {
                    rules[i].lastBucket = value
                    rules[i].count -= 1
                    reasons.append(rules[i].name)
                }
            }
            if reasons.isEmpty {
                decision.dropped.append(point.layer.index)
            } else {
                decision.kept.append(point.layer.index)
                decision.reasons[point.layer.index] = reasons
            }
        }
        decision.kept.sort()
        decision.dropped.sort()
        return decision
    }

    public struct Decision: Sendable, Equatable {
        /// Stable indices, ascending.
        public var kept: [Int] = []
        public var dropped: [Int] = []
        public var reasons: [Int: [String]] = [:]
    }
}
