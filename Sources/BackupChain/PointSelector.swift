import FoundationEssentials

/// How a command names a point in time of a repository (`restore --at POINT`, DESIGN
/// "Backup repositories"): its index (kept for life), its layer's file name, `latest`, or an
/// ISO 8601 time — the latest point at or before it.
public enum PointSelector: Sendable, Equatable, CustomStringConvertible {
    case latest
    case index(Int)
    case file(String)
    case time(ISOTime)

    /// Reads what a user typed: `latest`; digits (an index); something that starts like a date
    /// (`2026-12-01…`, which must then be a valid ISO 8601 time); anything else is a file name.
    public init(parsing text: String) throws {
        if text == "latest" {
            self = .latest
        } else if !text.isEmpty, text.utf8.count <= 12, text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let n = Int(text) {
            self = .index(n)
        } else if text.wholeMatch(of: /\d{4}-\d.*/) != nil {
            guard let time = ISOTime(parsing: text) else {
                throw ChainError(.invalidArgument, "'\(text)' is not an ISO 8601 time (e.g. 2026-12-01T02:00:00Z, 2026-12-01T03:00+01:00 or 2026-12-01)")
            }
            self = .time(time)
        } else if text.isEmpty {
            throw ChainError(.invalidArgument, "an empty point: give an index, a layer's file name, 'latest' or an ISO 8601 time")
        } else {
            self = .file(text)
        }
    }

    public var description: String {
        switch self {
        case .latest: "latest"
        case .index(let n): "\(n)"
        case .file(let name): name
        case .time(let time): time.text
        }
    }

    /// The position in `manifest.layers` of the point this names, or an error that names the
    /// points the repository holds.
    public func position(in manifest: BackupManifest, repository: String) throws -> Int {
        let layers = manifest.layers
        guard !layers.isEmpty else { throw ChainError(.invalidArgument, "the repository holds no backup", path: repository) }
        let found: Int?
        let what: String
        switch self {
        case .latest:
            return layers.count - 1
        case .index(let n):
            found = manifest.position(ofIndex: n)
            what = "no point \(n)"
        case .file(let name):
            // A path to a layer of this folder (as a shell completes it) names it too.
            let url = URL(fileURLWithPath: name)
            let inFolder = !name.contains("/")
                || url.deletingLastPathComponent().resolvingSymlinksInPath().path
                    == URL(fileURLWithPath: repository).resolvingSymlinksInPath().path
            found = inFolder ? layers.firstIndex { $0.file == url.lastPathComponent } : nil
            what = inFolder ? "no layer file '\(name)'" : "'\(name)' is not a file of this repository"
        case .time(let time):
            found = layers.indices.last { i in ISOTime(parsing: layers[i].created).map { $0 <= time } ?? false }
            what = time.wholeDay ? "no point on or before \(time.text) (UTC)" : "no point at or before \(time.text)"
        }
        guard let found else {
            throw ChainError(.invalidArgument, "\(what): the repository holds \(Self.held(layers)) (see 'qbackup list')",
                             path: repository)
        }
        return found
    }

    /// "point 3 (2026-12-01T02:00:00Z)" or "points 2 (…), 3 (…), 4 (…)"; a long list keeps its
    /// first and last three.
    static func held(_ layers: [BackupManifest.Layer]) -> String {
        func point(_ l: BackupManifest.Layer) -> String { "\(l.index) (\(l.created))" }
        if layers.count == 1 { return "point " + point(layers[0]) }
        let shown = layers.count <= 8
            ? layers.map(point)
            : layers.prefix(3).map(point) + ["…"] + layers.suffix(3).map(point)
        return "\(layers.count) points: " + shown.joined(separator: ", ")
    }
}

/// An ISO 8601 time as `restore --at` takes it and `created` records it: `YYYY-MM-DD`,
/// then optionally `THH:MM[:SS[.fraction]]` with a zone (`Z` or `±HH:MM`, `±HHMM`, `±HH`).
/// A date alone means the end of that day (UTC): the disk as it was on that day.
public struct ISOTime: Sendable, Equatable, Comparable {
    /// Seconds since 1970-01-01T00:00:00Z, and nanoseconds within the second.
    public var seconds: Int64
    public var nanoseconds: Int64
    /// The text it was read from.
    public var text: String
    /// A date alone (its last instant).
    public var wholeDay = false

    public init?(parsing text: String) {
        let pattern = /(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?([Zz]|[+-]\d{2}(?::?\d{2})?))?/
        guard text.utf8.count <= 64, let m = text.wholeMatch(of: pattern),
              let year = Int64(m.1), let month = Int64(m.2), let day = Int64(m.3),
              (1...12).contains(month), day >= 1, day <= Self.days(inMonth: month, year: year) else { return nil }
        let dayStart = Self.daysFromCivil(year: year, month: month, day: day) * 86400
        self.text = text
        guard let hourText = m.4, let minuteText = m.5, let zone = m.8 else {
            // A date alone: its last instant.
            seconds = dayStart + 86399
            nanoseconds = 999_999_999
            wholeDay = true
            return
        }
        guard let hour = Int64(hourText), let minute = Int64(minuteText), hour <= 23, minute <= 59 else { return nil }
        let second = m.6.flatMap { Int64($0) } ?? 0
        guard second <= 59 else { return nil }
        var nanos: Int64 = 0
        if let fraction = m.7 {
            nanos = Int64(fraction + String(repeating: "0", count: 9 - fraction.count)) ?? 0
        }
        var offset: Int64 = 0
        if zone != "Z" && zone != "z" {
            let digits = zone.dropFirst().filter { $0 != ":" }
            guard let hh = Int64(digits.prefix(2)), hh <= 23 else { return nil }
            let mm = digits.count > 2 ? Int64(digits.dropFirst(2)) ?? 99 : 0
            guard mm <= 59 else { return nil }
            offset = (hh * 3600 + mm * 60) * (zone.hasPrefix("-") ? -1 : 1)
        }
        seconds = dayStart + hour * 3600 + minute * 60 + second - offset
        nanoseconds = nanos
    }

    public static func < (a: ISOTime, b: ISOTime) -> Bool {
        (a.seconds, a.nanoseconds) < (b.seconds, b.nanoseconds)
    }

    public static func == (a: ISOTime, b: ISOTime) -> Bool {
        a.seconds == b.seconds && a.nanoseconds == b.nanoseconds
    }

    static func days(inMonth month: Int64, year: Int64) -> Int64 {
        switch month {
        case 2: (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: 30
        default: 31
        }
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    static func daysFromCivil(year: Int64, month: Int64, day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146097 + doe - 719468
    }
}
